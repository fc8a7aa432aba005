"""``RaySandboxManager``: the sandbox pool in a Ray actor, driven by a local orchestrator.

Real Ray (the session's local instance), a real pool in the actor: results come back as the
local manager's do, a bad payload is an ``InvalidPayload`` error, the host's death is
infrastructure (``WorkerLost``, retried, then an error naming the host), and shutdown leaves
no actor behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tangram_core.actions import Action, ActionStatus
from tangram_core.orchestrator import Orchestrator, OrchestratorConfig
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.ray_manager import RaySandboxManager

pytestmark = [pytest.mark.usefixtures("can_sandbox"), pytest.mark.slow]


def _run(code: str) -> Action:
    return Action(kind="sandbox.run", demand={"cpu": 1}, payload={"code": code})


def test_actions_run_in_the_ray_hosted_pool(ray_session: Any) -> None:
    manager = RaySandboxManager(PoolConfig(min_workers=2, max_workers=2))

    async def go() -> tuple[list[Any], dict[str, float], bool]:
        async with Orchestrator([manager]) as orch:
            results = await orch.submit_many(
                [
                    _run("print(6 * 7)"),
                    _run("import sys; sys.exit(3)"),
                    Action(kind="sandbox.run", demand={"cpu": 1}, payload={"cod": "typo"}),
                    Action(
                        kind="sandbox.run_tests",
                        demand={"cpu": 1},
                        payload={
                            "code": "n = int(input()); print(n * n)",
                            "tests": [
                                {"stdin": "3", "expected_stdout": "9"},
                                {"stdin": "4", "expected_stdout": "0"},
                            ],
                        },
                    ),
                ]
            )
            return results, manager.resources(), manager.health()

    (ok, failed, bad, tests), resources, healthy = asyncio.run(go())
    assert ok.status is ActionStatus.OK
    assert ok.output["stdout"] == "42\n"
    assert failed.status is ActionStatus.OK  # the program's own failure is a result
    assert failed.output["exit_code"] == 3
    assert bad.error_type == "InvalidPayload"
    assert "cod" in (bad.error or "")
    assert tests.output["pass_fraction"] == 0.5
    assert resources == {"cpu": 2.0}  # answered from the host's last report
    assert healthy
    assert manager.node_id == ray_session.get_runtime_context().get_node_id()
    assert manager.host is None  # shut down with the orchestrator


def test_a_dead_host_is_infrastructure_and_named(ray_session: Any) -> None:
    manager = RaySandboxManager(PoolConfig(min_workers=1, max_workers=1))

    async def go() -> Any:
        async with Orchestrator([manager], config=OrchestratorConfig(max_retries=1)) as orch:
            job = asyncio.ensure_future(orch.submit(_run("import time; time.sleep(30)")))
            await asyncio.sleep(2.0)
            ray_session.kill(manager.host)
            return await asyncio.wait_for(job, 60)

    result = asyncio.run(go())
    assert result.status is not ActionStatus.OK
    assert "sandbox host on node" in (result.error or "")
    assert "died" in (result.error or "")
    assert not manager.health()
