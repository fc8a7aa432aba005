#!/usr/bin/env python3
"""Tangram vs static provisioning on this machine: real worker processes, real actions.

The same closed-loop RL-like workload runs twice through the real ``Orchestrator`` and a real
``ProcessPoolManager``. Each trajectory is an asyncio task that alternates "generation" (an
asyncio sleep) with an action run in a worker process. Half the actions are elastic test
batches: ``sleep_task`` honours Amdahl's law for the units it is given.

* **static**: ``StaticLeaseScheduler``, one 1-unit sandbox per trajectory for its whole life,
  which is the most generous static setting (no trajectory waits for a sandbox);
* **tangram**: ``ElasticScheduler`` over the same pool of workers.

Sleep actions keep the comparison about scheduling, not about 2 cores' contention: a worker
that sleeps holds its slot exactly as a sandbox would. Writes
``tools/bench/results/tangram_real.json`` with ``act_ratio_vs_static``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result

from tangram_core.actions import Action, ActionResult
from tangram_core.baselines import StaticLeaseScheduler
from tangram_core.elasticity import Amdahl, Elasticity
from tangram_core.orchestrator import Orchestrator
from tangram_core.process_pool import ProcessPoolManager, function_action
from tangram_core.scheduler import Scheduler
from tangram_core.sim import summarize

RESULTS = Path(__file__).resolve().parent / "results"
SLEEP = "tangram_core.process_pool:sleep_task"


def workload(trajectories: int, seed: int) -> list[list[tuple[float, float, bool]]]:
    """Per trajectory, its turns: (generation seconds, action T(1) seconds, elastic?)."""
    rng = random.Random(seed)
    plans = []
    for _ in range(trajectories):
        turns = []
        for _ in range(rng.randint(2, 5)):
            gen = rng.lognormvariate(math.log(0.4), 0.5)
            t1 = min(rng.lognormvariate(math.log(0.25), 1.0), 3.0)
            turns.append((gen, t1, rng.random() < 0.5))
        plans.append(turns)
    return plans


def action(traj: str, t1: float, elastic: bool) -> Action:
    p = 0.9 if elastic else 0.0
    return function_action(
        SLEEP,
        t1,
        kwargs={"parallel_fraction": p},
        kind="process.tests" if elastic else "process.exec",
        trajectory_id=traj,
        elasticity=Elasticity(max_units=4 if elastic else 1, speedup=Amdahl(parallel_fraction=p)),
    )


async def run(scheduler: Scheduler | None, plans: list, workers: int) -> dict[str, Any]:
    pool = ProcessPoolManager(workers=workers)
    results: list[ActionResult] = []
    async with Orchestrator([pool], scheduler=scheduler) as orch:

        async def trajectory(i: int, turns: list[tuple[float, float, bool]]) -> float:
            t0 = time.monotonic()
            for gen, t1, elastic in turns:
                await asyncio.sleep(gen)
                result = await orch.submit(action(f"t{i}", t1, elastic))
                if not result.ok:
                    raise RuntimeError(f"action failed: {result.status} {result.error}")
                results.append(result)
            orch.end_trajectory(f"t{i}")
            return time.monotonic() - t0

        t_start = time.monotonic()
        durations = await asyncio.gather(*[trajectory(i, t) for i, t in enumerate(plans)])
        step = time.monotonic() - t_start
    acts = summarize([r.act_s for r in results])
    return {
        "act": acts,
        "queue_wait_mean_s": sum(r.queue_wait_s for r in results) / len(results),
        "mean_units": sum(r.units for r in results) / len(results),
        "step_s": step,
        "trajectory_mean_s": sum(durations) / len(durations),
        "actions": len(results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "tangram_real.json")
    args = parser.parse_args(argv)
    plans = workload(args.trajectories, args.seed)
    n = args.trajectories
    static = asyncio.run(run(StaticLeaseScheduler(n, {"cpu": 1.0}, fleets={}), plans, n))
    ours = asyncio.run(run(None, plans, n))
    ratio = static["act"]["mean"] / ours["act"]["mean"]
    for name, r in (("static", static), ("tangram", ours)):
        print(
            f"{name:>8}: {r['actions']} actions, mean ACT {r['act']['mean']:.3f}s "
            f"(p50 {r['act']['p50']:.3f}, p99 {r['act']['p99']:.3f}), mean units "
            f"{r['mean_units']:.2f}, step {r['step_s']:.2f}s"
        )
    print(f"ACT ratio vs static: x{ratio:.2f}; step x{static['step_s'] / ours['step_s']:.2f}")
    result = {
        "benchmark": "tangram_real",
        "act_ratio_vs_static": ratio,
        "step_speedup_vs_static": static["step_s"] / ours["step_s"],
        "static": static,
        "tangram": ours,
        "setting": f"{n} trajectories, {n} worker processes; static: one 1-unit sandbox each",
        "versions": machine_info("tangram-core"),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
