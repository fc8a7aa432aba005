"""``SandboxManager`` under tangram-core's orchestrator: actions in, results and spans out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tangram_core import semconv
from tangram_core.actions import Action, ActionStatus
from tangram_core.orchestrator import Orchestrator
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.manager import SandboxManager

pytestmark = pytest.mark.usefixtures("can_sandbox")


def test_sandbox_actions_run_through_the_orchestrator(span_exporter: Any) -> None:
    async def go() -> list[Any]:
        manager = SandboxManager(PoolConfig(min_workers=1, max_workers=2))
        async with Orchestrator([manager]) as orch:
            tests = [{"stdin": "3", "expected_stdout": "9"}, {"stdin": "4", "expected_stdout": "0"}]
            return await orch.submit_many(
                [
                    Action(kind="sandbox.run", demand={"cpu": 1}, payload={"code": "print(7)"}),
                    Action(
                        kind="sandbox.run_tests",
                        demand={"cpu": 1},
                        payload={"code": "n = int(input()); print(n * n)", "tests": tests},
                    ),
                    Action(kind="sandbox.run", demand={"cpu": 1}, payload={"cod": "typo"}),
                ]
            )

    run, batch, bad = asyncio.run(go())
    assert run.status is ActionStatus.OK
    assert run.output["stdout"] == "7\n"
    assert batch.output["pass_fraction"] == 0.5
    assert bad.status is not ActionStatus.OK
    assert bad.error_type == "InvalidPayload"
    assert "cod" in (bad.error or "")
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    sandbox_span = spans[semconv.SPAN_SANDBOX_RUN]
    assert sandbox_span.attributes[semconv.SANDBOX_STATUS] == "ok"
    assert sandbox_span.attributes[semconv.SANDBOX_LANGUAGE] == "python"
    # The execution span is a child of the orchestrator's action span.
    action_span_ids = {
        s.context.span_id
        for s in span_exporter.get_finished_spans()
        if s.name == semconv.SPAN_ACTION
    }
    assert sandbox_span.parent is not None
    assert sandbox_span.parent.span_id in action_span_ids


def test_capacity_follows_the_pool() -> None:
    async def go() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        manager = SandboxManager(PoolConfig(min_workers=1, max_workers=3))
        await manager.open()
        try:
            before = manager.resources()
            await manager.scale_to(2)
            await manager.pool.wait_ready()
            return before, manager.resources(), manager.limits()
        finally:
            await manager.shutdown()

    before, after, limits = asyncio.run(go())
    assert before == {"cpu": 1.0}
    assert after == {"cpu": 2.0}
    assert limits == {"cpu": 3.0}
