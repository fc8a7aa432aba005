"""The orchestrator drives the static baseline like any scheduler; ending a trajectory frees
its sandbox lease (real worker processes)."""

from __future__ import annotations

import asyncio

import pytest

from tangram_core.baselines import StaticLeaseScheduler
from tangram_core.orchestrator import Orchestrator
from tangram_core.process_pool import ProcessPoolManager, function_action

SLEEP = "tangram_core.process_pool:sleep_task"


def test_static_lease_waits_for_end_trajectory():
    async def main() -> tuple[float, float]:
        pool = ProcessPoolManager(workers=1)
        sched = StaticLeaseScheduler(1, {"cpu": 1.0}, fleets={})
        async with Orchestrator([pool], scheduler=sched) as orch:
            first = await orch.submit(function_action(SLEEP, 0.05, trajectory_id="a"))
            assert first.ok
            second = asyncio.ensure_future(
                orch.submit(function_action(SLEEP, 0.05, trajectory_id="b"))
            )
            await asyncio.sleep(0.5)
            assert not second.done()  # "a" still holds the only sandbox, though it is idle
            t_end = asyncio.get_running_loop().time()
            orch.end_trajectory("a")
            result = await second
            return t_end, result.start_time or 0.0

    t_end, started = asyncio.run(main())
    assert started >= t_end - 0.05  # started only once "a" was over


def test_static_baseline_refuses_a_pool_of_another_size():
    async def main() -> None:
        pool = ProcessPoolManager(workers=2)
        async with Orchestrator([pool], scheduler=StaticLeaseScheduler(1, {"cpu": 1.0}, {})):
            pass

    with pytest.raises(TypeError, match="fixed partitions"):
        asyncio.run(main())
