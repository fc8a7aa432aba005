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


def test_queue_utilisation_capacity_and_scale_metrics(metric_reader):
    async def main() -> None:
        pool = ProcessPoolManager(workers=1, max_workers=2)
        async with Orchestrator([pool]) as orch:
            long = asyncio.ensure_future(orch.submit(function_action(SLEEP, 0.5)))
            waiting = asyncio.ensure_future(orch.submit(function_action(SLEEP, 0.01)))
            await asyncio.sleep(0.2)
            me = ("tangram.orchestrator", orch.name)
            cpu = ("tangram.resource.type", "cpu")
            points = _points(metric_reader)
            assert points[("tangram.queue.length", (me,))] == 1
            assert points[("tangram.resource.utilisation", (me, cpu))] == 1.0
            await orch.scale_to(pool.name, 2)
            await asyncio.gather(long, waiting)
            points = _points(metric_reader)
            assert points[("tangram.pool.capacity", (me, cpu))] == 2.0
            assert points[("tangram.queue.length", (me,))] == 0
            scale = [v for (name, _), v in points.items() if name == "tangram.pool.scale_events"]
            assert scale
            assert sum(scale) >= 1

    asyncio.run(main())


def _points(reader) -> dict:
    """Latest value of every data point, keyed by (metric name, sorted attributes)."""
    out: dict = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    if hasattr(point, "value"):
                        out[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    return out
