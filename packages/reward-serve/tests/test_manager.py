"""RewardManager under the real Orchestrator, on a real local Ray Serve."""

from __future__ import annotations

import asyncio

import pytest

from tangram_core.actions import Action, ActionStatus
from tangram_core.orchestrator import Orchestrator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rules_app(ray_session):
    from ray import serve

    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    # A real tracer in the replicas (console exporter), so their spans have ids of their own.
    env = {"OTEL_TRACES_EXPORTER": "console"}
    cfg = RewardDeploymentConfig(name="mrules", kind="rules", num_cpus=0.25, env=env)
    serve.run(build_app(cfg), name="mrules", route_prefix="/mrules", external_scaler_enabled=True)
    yield "mrules"
    serve.shutdown()  # the next module starts Serve with its own HTTP options


def reward_action(response: str, reference: str, traj: str = "t") -> Action:
    request = {"response": response, "reference": reference}
    return Action(
        kind="reward.rules", demand={"reward": 1}, trajectory_id=traj, payload={"request": request}
    )


def test_rewards_run_as_actions_and_the_pool_scales(rules_app):
    from tangram_reward.manager import RewardManager, RewardManagerConfig

    async def main() -> None:
        manager = RewardManager(
            RewardManagerConfig(app=rules_app, concurrency_per_replica=4, max_replicas=2)
        )
        assert manager.resources() == {"reward": 4.0}
        assert manager.limits() == {"reward": 8.0}
        async with Orchestrator([manager]) as orch:
            actions = [
                reward_action(rf"\boxed{{{i}}}", str(i if i % 2 else i + 1)) for i in range(20)
            ]
            results = await orch.submit_many(actions)
            assert [r.status for r in results] == [ActionStatus.OK] * 20
            assert [r.output["reward"] for r in results] == [float(i % 2) for i in range(20)]
            await manager.scale_to(8)  # two replicas of 4 slots
            assert manager.resources() == {"reward": 8.0}
            orch.refresh()
            assert orch.capacity()["reward"] == 8.0
            bad = await orch.submit(
                Action(
                    kind="reward.rules",
                    demand={"reward": 1},
                    payload={"request": {"response": "1"}},
                )
            )
            assert bad.status is ActionStatus.ERROR
            assert bad.error_type == "ValueError"
            assert "needs a non-empty 'reference'" in (bad.error or "")
            with pytest.raises(ValueError, match="more than max_replicas"):
                await manager.scale_to(40)
            await manager.scale_to(4)
            assert manager.resources() == {"reward": 4.0}

    asyncio.run(main())


def test_config_bounds_are_checked():
    from pydantic import ValidationError

    from tangram_reward.manager import RewardManagerConfig

    with pytest.raises(ValidationError, match=r"max_replicas \(1\) must be >= min_replicas \(2\)"):
        RewardManagerConfig(app="x", min_replicas=2, max_replicas=1)


def test_each_scoring_request_is_a_span_under_its_action(rules_app, span_exporter):
    from tangram_core import semconv
    from tangram_reward.manager import RewardManager, RewardManagerConfig

    async def main() -> list:
        manager = RewardManager(RewardManagerConfig(app=rules_app, concurrency_per_replica=4))
        async with Orchestrator([manager]) as orch:
            return await orch.submit_many([reward_action("1", "1", f"t{i}") for i in range(6)])

    results = asyncio.run(main())
    ours = {format(s.context.span_id, "016x") for s in span_exporter.get_finished_spans()}
    action_spans = {
        s.attributes[semconv.ACTION_ID]: s
        for s in span_exporter.get_finished_spans()
        if s.name == semconv.SPAN_ACTION
    }
    for result in results:
        meta = result.output["meta"]
        action = action_spans[result.action_id]
        # The replica's span is a real child of this action's span, in the same trace.
        assert meta["trace_id"] == format(action.context.trace_id, "032x")
        assert meta["parent_span_id"] in ours, "the replica's parent is a span of the caller"
        assert meta["span_id"] != format(action.context.span_id, "016x")
        assert meta["batch_size"] >= 1
        assert meta["replica"]


def test_capacity_comes_from_a_background_poll_not_a_controller_call_per_action(
    rules_app, monkeypatch
):
    """``serve.status()`` is a blocking controller round trip; asking it on every submission
    and completion (the orchestrator's capacity reads) held the event loop for ~80 ms per
    action. Now the count is polled off the loop, and a change made behind the manager's back
    (another client scaling the deployment) still reaches the orchestrator."""
    import time

    import tangram_reward.manager as manager_module
    from tangram_reward.manager import RewardManager, RewardManagerConfig
    from tangram_reward.serve_control import running_replicas, scale_deployment

    reads = 0

    def counted(app: str, deployment: str) -> int:  # the real call, counted
        nonlocal reads
        reads += 1
        return running_replicas(app, deployment)

    monkeypatch.setattr(manager_module, "running_replicas", counted)

    async def main() -> dict[str, float]:
        manager = RewardManager(
            RewardManagerConfig(
                app=rules_app, concurrency_per_replica=4, max_replicas=2, status_poll_s=0.2
            )
        )
        async with Orchestrator([manager]) as orch:
            t0 = time.monotonic()
            actions = [reward_action(rf"\boxed{{{i}}}", str(i)) for i in range(40)]
            results = await orch.submit_many(actions)
            elapsed = time.monotonic() - t0
            assert [r.output["reward"] for r in results] == [1.0] * 40
            assert reads <= 2 + elapsed / 0.2 + 1, f"{reads} controller reads in {elapsed:.1f}s"

            scale_deployment(rules_app, "mrules", 2)  # not through the manager
            deadline = time.monotonic() + 60
            while orch.capacity().get("reward") != 8.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            seen = orch.capacity()
            await manager.scale_to(4)
            return seen

    seen = asyncio.run(main())
    assert seen == {"reward": 8.0}
