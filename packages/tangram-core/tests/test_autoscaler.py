"""The autoscaling loop grows a real process pool under a queue and shrinks it when idle."""

from __future__ import annotations

import asyncio

import pytest

from tangram_core.autoscaling import AutoscalingConfig
from tangram_core.autoscaling.loop import Autoscaler
from tangram_core.orchestrator import Orchestrator
from tangram_core.process_pool import ProcessPoolManager, function_action

SLEEP = "tangram_core.process_pool:sleep_task"


def test_pool_grows_under_load_and_shrinks_when_idle():
    async def main() -> tuple[int, int, int]:
        pool = ProcessPoolManager(workers=1, max_workers=4)
        config = AutoscalingConfig(min_units=1, max_units=4, downscale_delay_s=0.3)
        async with Orchestrator([pool]) as orch:
            scaler = Autoscaler(orch, {pool.name: config}, interval_s=0.05)
            async with scaler:
                jobs = [orch.submit(function_action(SLEEP, 0.4)) for _ in range(8)]
                sizes: list[int] = []

                async def watch() -> None:
                    while True:
                        sizes.append(len(pool.worker_pids()))
                        await asyncio.sleep(0.05)

                watcher = asyncio.create_task(watch())
                results = await asyncio.gather(*jobs)
                assert all(r.ok for r in results)
                peak = max(sizes)
                await asyncio.sleep(1.5)  # idle: damped scale-down
                watcher.cancel()
                after = int(pool.resources()["cpu"])
            return peak, after, len(results)

    peak, after, n = asyncio.run(main())
    assert n == 8
    assert peak == 4  # 8 x 0.4 s queued on 1 worker: waiting beats a cold start
    assert after == 1


def test_autoscaler_rejects_unknown_managers_and_bad_intervals():
    async def main() -> None:
        pool = ProcessPoolManager(workers=1)
        async with Orchestrator([pool]) as orch:
            with pytest.raises(KeyError, match="no resource manager named"):
                Autoscaler(orch, {"nope": AutoscalingConfig()})
            with pytest.raises(ValueError, match=r"interval_s \(0\) must be > 0"):
                Autoscaler(orch, {pool.name: AutoscalingConfig()}, interval_s=0)

    asyncio.run(main())
