#!/usr/bin/env python3
"""Rule rewards per second through tangram-core's Orchestrator and the RewardManager.

``tools/bench/reward_serve.py`` measures the Serve deployment from its handle; this one measures
what a trainer sees: every reward is a tangram action, queued, scheduled and started on the
deployment by :class:`tangram_reward.manager.RewardManager`. The orchestrator reads each
manager's capacity on every submission and completion, so the manager must answer from
memory. Two managers on the same deployment, in one run:

* **baseline**: ``PerQueryStatusManager`` reads the replica count from Serve's controller
  (``serve.status()``, a blocking round trip) on every capacity query, as the manager did before
  it polled in the background;
* **ours**: the RewardManager, whose count is polled off the event loop every
  ``status_poll_s``.

Writes ``tools/bench/results/reward_manager.json``. Run: ``python tools/bench/reward_manager.py``.
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

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
APP = "bench-rules"


def _managers() -> dict[str, Any]:
    from tangram_reward.manager import RewardManager, RewardManagerConfig
    from tangram_reward.serve_control import running_replicas

    class PerQueryStatusManager(RewardManager):
        """The baseline: one controller round trip per capacity query (the old behaviour)."""

        def _replicas(self) -> int:
            return running_replicas(self.config.app, self._deployment)

    cfg = RewardManagerConfig(app=APP, kinds=("reward.rules",), concurrency_per_replica=32)
    return {"baseline": PerQueryStatusManager(cfg), "ours": RewardManager(cfg)}


def _actions(n: int) -> list[Any]:
    from tangram_core.actions import Action

    return [
        Action(
            kind="reward.rules",
            demand={"reward": 1.0},
            payload={
                "request": {
                    "response": f"<think>add</think><answer>{i}</answer>",
                    "reference": str(i),
                    "rules": ["math", "format"],
                }
            },
        )
        for i in range(n)
    ]


async def _measure(manager: Any, n: int, rounds: int) -> dict[str, Any]:
    from tangram_core.orchestrator import Orchestrator

    rates, acts = [], []
    async with Orchestrator([manager]) as orch:
        await orch.submit_many(_actions(8))  # warm: handle, router, replica
        for _ in range(rounds):
            t0 = time.perf_counter()
            results = await orch.submit_many(_actions(n))
            wall = time.perf_counter() - t0
            if not all(r.ok for r in results):
                raise RuntimeError(f"a reward failed: {[r.error for r in results if not r.ok]}")
            rates.append(n / wall)
            acts.append(statistics.fmean(r.act_s for r in results))
    return {
        "rewards_per_s": statistics.median(rates),
        "rewards_per_s_rounds": rates,
        "act_mean_s": statistics.median(acts),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="rewards per round (one step's worth)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "reward_manager.json")
    args = p.parse_args(argv)
    import ray
    from _machine import machine_info, write_result
    from ray import serve

    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    ray.init(
        address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        cfg = RewardDeploymentConfig(name=APP, kind="rules", num_cpus=0.25)
        serve.run(build_app(cfg), name=APP, route_prefix=None, external_scaler_enabled=True)
        out: dict[str, Any] = {}
        for name, manager in _managers().items():
            out[name] = asyncio.run(_measure(manager, args.n, args.rounds))
            print(
                f"{name}: {out[name]['rewards_per_s']:.0f} rewards/s, "
                f"mean ACT {out[name]['act_mean_s'] * 1e3:.0f} ms"
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    speedup = out["ours"]["rewards_per_s"] / out["baseline"]["rewards_per_s"]
    print(f"background poll over a controller read per query: {speedup:.1f}x")
    result = {
        "machine": machine_info("ray", "tangram-reward-serve"),
        "workload": f"{args.n} rule rewards (math + format) per round, one replica, "
        f"{args.rounds} rounds, median",
        "rewards_per_s_baseline": out["baseline"]["rewards_per_s"],
        "rewards_per_s_ours": out["ours"]["rewards_per_s"],
        "speedup": speedup,
        "details": out,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
