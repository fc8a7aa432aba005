"""The Ray-backed orchestrator: one orchestrator actor, submitters in other Ray processes."""

from __future__ import annotations

import asyncio

import pytest

from tangram_core.actions import ActionStatus
from tangram_core.process_pool import function_action

pytestmark = pytest.mark.slow
SLEEP = "tangram_core.process_pool:sleep_task"


def _managers():
    from tangram_core.ray.pool import RayActorPoolManager, RayPoolConfig

    return [RayActorPoolManager(2, config=RayPoolConfig(num_cpus_per_worker=0.25))]


def test_remote_orchestrator_serves_submitters_across_processes(ray_session):
    ray = ray_session
    from tangram_core.ray.runtime import RemoteOrchestrator

    remote = RemoteOrchestrator.start(_managers, name="tangram-test")

    @ray.remote(num_cpus=0)
    def rollout_worker(i: int) -> str:
        """A separate Ray worker process, as a rollout worker on another node would be."""
        from tangram_core.ray.runtime import RemoteOrchestrator as Client

        client = Client.connect("tangram-test")
        action = function_action(SLEEP, 0.05, kind="ray.sleep", trajectory_id=f"t{i}")
        return asyncio.run(client.submit(action)).status.value

    try:
        assert ray.get([rollout_worker.remote(i) for i in range(6)]) == ["ok"] * 6
        assert asyncio.run(remote.capacity()) == {"cpu": 2.0}
        bad = function_action(SLEEP, 0.01, kind="nobody.handles.this")
        result = asyncio.run(remote.submit(bad))
        assert result.status is ActionStatus.REJECTED
        assert "nobody.handles.this" in (result.error or "")
    finally:
        asyncio.run(remote.shutdown())


def test_connect_to_a_missing_orchestrator_is_clear(ray_session):
    from tangram_core.ray.runtime import RemoteOrchestrator

    with pytest.raises(LookupError, match="no Tangram orchestrator actor named 'nope'"):
        RemoteOrchestrator.connect("nope")
