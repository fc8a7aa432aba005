"""``SandboxManager`` under tangram-core's orchestrator: actions in, results and spans out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tangram_core import semconv
from tangram_core.actions import Action, ActionStatus
from tangram_core.elasticity import Amdahl, Elasticity
from tangram_core.orchestrator import Orchestrator
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.manager import SandboxManager
from tangram_sandbox.pool import SandboxPool

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


def test_an_elastic_run_tests_action_spreads_its_tests_over_its_units(span_exporter: Any) -> None:
    """Started on 4 units, a batch of 8 tests runs as 4 contiguous shares, each in its own
    sandbox (told apart by a token file in its private working directory), and comes back as
    one result in test order."""
    code = (
        "import os, sys\n"
        "if not os.path.exists('token'):\n"
        "    open('token', 'w').write(os.urandom(8).hex())\n"
        "sys.stderr.write(open('token').read())\n"
        "print(int(input()) * 2)\n"
    )
    tests = [{"stdin": str(i), "expected_stdout": str(2 * i)} for i in range(8)]
    tests[5]["expected_stdout"] = "wrong"

    def action(stop: bool) -> Action:
        return Action(
            kind="sandbox.run_tests",
            demand={"cpu": 1},
            elasticity=Elasticity(max_units=4, speedup=Amdahl(parallel_fraction=1.0)),
            estimated_duration_s=8.0,
            payload={"code": code, "tests": tests, "stop_on_first_failure": stop},
        )

    async def go() -> list[Any]:
        manager = SandboxManager(PoolConfig(min_workers=4, max_workers=4))
        async with Orchestrator([manager]) as orch:
            return [await orch.submit(action(False)), await orch.submit(action(True))]

    spread, stopped = asyncio.run(go())
    assert spread.status is ActionStatus.OK
    assert spread.units == 4
    out = spread.output
    assert [v["index"] for v in out["verdicts"]] == list(range(8))
    assert [v["passed"] for v in out["verdicts"]] == [i != 5 for i in range(8)]
    assert (out["passed"], out["total"]) == (7, 8)
    tokens = [v["stderr"] for v in out["verdicts"]]
    assert len(set(tokens)) == 4
    assert tokens[0::2] == tokens[1::2]  # shares of two contiguous tests
    # Early stop holds across shares: nothing after the first failing test is reported.
    assert [v["index"] for v in stopped.output["verdicts"]] == list(range(6))
    assert (stopped.output["passed"], stopped.output["total"]) == (5, 8)
    spans = [s for s in span_exporter.get_finished_spans() if s.name == "tangram.sandbox.run_tests"]
    assert [s.attributes[semconv.SANDBOX_WORKERS] for s in spans] == [4, 4]


def test_run_tests_refuses_zero_workers() -> None:
    async def go() -> None:
        async with SandboxPool(PoolConfig(min_workers=1, max_workers=1)) as pool:
            with pytest.raises(ValueError, match="at least one worker"):
                await pool.run_tests(
                    code="print(1)", tests=[{"stdin": "", "expected_stdout": "1"}], workers=0
                )

    asyncio.run(go())


def test_a_spread_run_tests_whose_share_fails_withdraws_the_others() -> None:
    """Both workers busy and room for one waiter: the first share queues, the second gets
    QueueFull. The caller sees QueueFull, and the first share leaves the queue with it instead
    of running later for a result nobody reads."""
    from tangram_sandbox.pool import QueueFull

    async def go() -> tuple[int, int]:
        config = PoolConfig(min_workers=2, max_workers=2, max_queue=1)
        async with SandboxPool(config) as pool:
            blockers = [
                asyncio.ensure_future(pool.run(code="import time; time.sleep(1.5)"))
                for _ in range(2)
            ]
            for _ in range(200):
                if pool.busy == 2:
                    break
                await asyncio.sleep(0.02)
            tests = [{"stdin": "", "expected_stdout": "1"} for _ in range(2)]
            with pytest.raises(QueueFull):
                await pool.run_tests(code="print(1)", tests=tests, workers=2)
            queued_after = pool.queued
            await asyncio.gather(*blockers)
            return queued_after, pool.busy

    assert asyncio.run(go()) == (0, 0)


def test_a_cancelled_waiter_frees_its_place_in_the_bounded_queue() -> None:
    """One worker busy, room for one waiter: a request that waits and is cancelled must not
    keep the place, or the next request gets QueueFull while nothing waits."""

    async def go() -> tuple[int, str]:
        async with SandboxPool(PoolConfig(min_workers=1, max_workers=1, max_queue=1)) as pool:
            blocker = asyncio.ensure_future(pool.run(code="import time; time.sleep(1.0)"))
            for _ in range(200):
                if pool.busy == 1:
                    break
                await asyncio.sleep(0.02)
            waiter = asyncio.ensure_future(pool.run(code="print('never')"))
            await asyncio.sleep(0.1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            queued = pool.queued
            after = await pool.run(code="print('queued fine')")  # no QueueFull
            await blocker
            return queued, after.stdout

    assert asyncio.run(go()) == (0, "queued fine\n")
