"""RayActorPoolManager on a real local Ray, under the real Orchestrator."""

from __future__ import annotations

import asyncio
import os

import pytest

from tangram_core.actions import ActionStatus
from tangram_core.orchestrator import Orchestrator
from tangram_core.process_pool import function_action

pytestmark = pytest.mark.slow
SLEEP = "tangram_core.process_pool:sleep_task"


def pool(workers: int = 2, **kw):
    from tangram_core.ray.pool import RayActorPoolManager, RayPoolConfig

    return RayActorPoolManager(workers, config=RayPoolConfig(num_cpus_per_worker=0.25), **kw)


def test_actions_run_in_ray_actors(ray_session):
    async def main() -> None:
        manager = pool(2)
        async with Orchestrator([manager]) as orch:
            results = await orch.submit_many(
                [function_action(SLEEP, 0.05, kind="ray.sleep") for _ in range(6)]
                + [function_action("tangram_core.process_pool:cpu_task", 1000, kind="ray.cpu")]
            )
            assert [r.status for r in results] == [ActionStatus.OK] * 7
            assert results[0].output == pytest.approx(0.05)
            pids = manager.worker_pids()
            assert len(set(pids)) == 2
            assert os.getpid() not in pids
            bad = await orch.submit(function_action("math:sqrt", -1.0, kind="ray.math"))
            assert bad.status is ActionStatus.ERROR
            assert bad.error_type == "ValueError"
            assert bad.attempts == 1  # the function's own error: not retried

    asyncio.run(main())


def test_killed_actor_is_replaced_and_the_action_retried(ray_session):
    import ray

    async def main() -> None:
        manager = pool(2)
        async with Orchestrator([manager]) as orch:
            futures = [
                asyncio.ensure_future(orch.submit(function_action(SLEEP, 1.0, kind="ray.sleep")))
                for _ in range(2)
            ]
            await asyncio.sleep(0.5)
            victim = next(iter(manager.running().values()))
            ray.kill(victim)
            results = await asyncio.gather(*futures)
            assert [r.status for r in results] == [ActionStatus.OK, ActionStatus.OK]
            assert sorted(r.attempts for r in results) == [1, 2]
            assert manager.health()

    asyncio.run(main())


def test_cancel_and_scaling(ray_session):
    async def main() -> None:
        manager = pool(1, max_workers=3)
        async with Orchestrator([manager]) as orch:
            long = function_action(SLEEP, 30.0, kind="ray.sleep", trajectory_id="t")
            future = asyncio.ensure_future(orch.submit(long))
            await asyncio.sleep(0.5)
            assert await orch.cancel_trajectory("t") == 1
            assert (await future).status is ActionStatus.CANCELLED
            await orch.scale_to(manager.name, 3)
            assert manager.resources() == {"cpu": 3.0}
            assert len(manager.worker_pids()) == 3
            await orch.scale_to(manager.name, 1)
            assert len(manager.worker_pids()) == 1
            with pytest.raises(ValueError, match=r"outside 0\.\.3"):
                await manager.scale_to(5)
            ok = await orch.submit(function_action(SLEEP, 0.01, kind="ray.sleep"))
            assert ok.status is ActionStatus.OK

    asyncio.run(main())
