"""The Orchestrator on real worker processes: order, backpressure, failures, retries, spans."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from tangram_core import semconv as sc
from tangram_core.actions import Action, ActionResult, ActionStatus
from tangram_core.elasticity import Amdahl, Elasticity
from tangram_core.orchestrator import Orchestrator, OrchestratorConfig, QueueFull
from tangram_core.process_pool import ProcessPoolConfig, ProcessPoolManager, function_action
from tangram_core.resource_manager import ResourceManager
from tangram_core.testing import pid_alive

SLEEP = "tangram_core.process_pool:sleep_task"
CPU = "tangram_core.process_pool:cpu_task"


def sleep(seconds: float, **fields: object) -> Action:
    """A sleep action whose estimate is its true duration (unless the test says otherwise)."""
    fields.setdefault("estimated_duration_s", max(seconds, 0.01))
    return function_action(SLEEP, seconds, **fields)


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5.0
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if pid_alive(p)], "worker processes outlived shutdown"


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def test_results_carry_outputs_and_consistent_timings():
    async def main() -> None:
        pool = ProcessPoolManager(2)
        async with Orchestrator([pool]) as orch:
            results = await orch.submit_many(
                [sleep(0.1, trajectory_id="t1"), function_action(CPU, 50_000), sleep(0.05)]
            )
            pids = pool.worker_pids()
        assert [r.status for r in results] == [ActionStatus.OK] * 3
        assert results[0].output == pytest.approx(0.1)
        assert isinstance(results[1].output, int)
        assert results[0].trajectory_id == "t1"
        for r in results:
            assert r.start_time is not None
            assert r.submit_time <= r.start_time <= r.end_time
            assert (r.units, r.attempts, r.error, r.error_type) == (1, 1, None, None)
        assert results[0].run_time_s >= 0.1
        assert results[2].queue_wait_s >= 0.0
        assert_gone(pids)

    asyncio.run(main())


def test_shortest_estimated_work_runs_first():
    async def main() -> None:
        async with Orchestrator([ProcessPoolManager(1)]) as orch:
            blocker = asyncio.create_task(orch.submit(sleep(0.4)))
            await wait_for(lambda: orch.running == 1)
            long = asyncio.create_task(orch.submit(sleep(0.2, estimated_duration_s=10.0)))
            await asyncio.sleep(0.01)
            short = asyncio.create_task(orch.submit(sleep(0.05, estimated_duration_s=0.05)))
            await wait_for(lambda: orch.queued == 2)
            done = await asyncio.gather(blocker, long, short)
        b, lg, sh = done
        assert all(r.ok for r in done)
        assert sh.end_time <= lg.start_time  # submitted later, but shorter: it went first
        assert b.end_time <= sh.start_time

    asyncio.run(main())


def test_backpressure_holds_submitters_in_order_and_loses_nothing():
    async def main() -> None:
        config = OrchestratorConfig(max_queue=2)
        async with Orchestrator([ProcessPoolManager(1)], config=config) as orch:
            tasks = [asyncio.create_task(orch.submit(sleep(0.1))) for _ in range(6)]
            await wait_for(lambda: orch.running == 1 and orch.queued == 2)
            assert orch.waiting == 3  # 1 running + 2 queued + 3 held back
            with pytest.raises(QueueFull, match=r"max_queue=2"):
                orch.submit_nowait(sleep(0.1))
            peak = 0
            while not all(t.done() for t in tasks):
                peak = max(peak, orch.queued)
                await asyncio.sleep(0.01)
            results = [t.result() for t in tasks]
            late = await orch.submit_nowait(sleep(0.01))  # room again: admitted at once
        assert peak <= 2
        assert all(r.ok for r in results)
        assert late.ok
        starts = [r.start_time for r in results]
        assert starts == sorted(starts)  # equal estimates: first submitted, first started

    asyncio.run(main())


def test_actions_that_cannot_run_are_rejected_with_the_reason():
    async def main() -> None:
        async with Orchestrator([ProcessPoolManager(2)]) as orch:
            results = await orch.submit_many(
                [
                    sleep(0.01),
                    Action(kind="gpu.magic", payload={}),
                    sleep(0.01, demand={"cpu": 3.0}),  # more than the pool can ever hold
                    sleep(0.01, demand={"gpu": 1.0}),  # a resource this pool does not have
                    sleep(0.01),
                ]
            )
        ok, unknown, too_big, wrong, ok2 = results
        assert ok.ok
        assert ok2.ok
        assert unknown.status is ActionStatus.REJECTED
        assert unknown.error_type == "UnknownActionKind"
        assert "'gpu.magic'" in unknown.error
        assert "process.*" in unknown.error
        assert too_big.status is ActionStatus.REJECTED
        assert too_big.error_type == "CapacityError"
        assert "3 cpu" in too_big.error
        assert wrong.status is ActionStatus.REJECTED
        assert "'gpu'" in wrong.error
        assert unknown.attempts == 0
        assert unknown.start_time is None

    asyncio.run(main())


def test_an_action_that_raises_ends_error_with_its_exception_type():
    async def main() -> None:
        async with Orchestrator([ProcessPoolManager(1)]) as orch:
            bad, good = await orch.submit_many(
                [function_action("math:sqrt", -1), function_action("math:sqrt", 9)]
            )
        assert bad.status is ActionStatus.ERROR
        assert bad.error_type == "ValueError"
        assert "math domain error" in bad.error
        assert bad.attempts == 1  # an action's own error is not retried
        assert good.ok
        assert good.output == 3.0

    asyncio.run(main())


def test_killing_a_worker_under_load_retries_that_action_and_loses_nothing():
    async def main() -> None:
        pool = ProcessPoolManager(2)
        async with Orchestrator([pool]) as orch:
            actions = [sleep(0.1) for _ in range(20)]
            target = actions[4]
            tasks = [asyncio.create_task(orch.submit(a)) for a in actions]
            await wait_for(lambda: target.id in pool.running())
            os.kill(pool.running()[target.id], signal.SIGKILL)
            results = await asyncio.gather(*tasks)
        assert len(results) == 20
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        by_id = {r.action_id: r for r in results}
        assert by_id[target.id].attempts == 2
        assert all(r.attempts == 1 for r in results if r.action_id != target.id)

    asyncio.run(main())


def test_retries_exhausted_end_infra_error(span_exporter):
    async def main() -> ActionResult:
        config = OrchestratorConfig(max_retries=1)
        async with Orchestrator([ProcessPoolManager(1)], config=config) as orch:
            return await orch.submit(function_action("os:_exit", 7))

    result = asyncio.run(main())
    assert result.status is ActionStatus.INFRA_ERROR
    assert result.error_type == "WorkerLost"
    assert result.attempts == 2
    assert "2 attempt(s)" in result.error
    assert "exited with code 7" in result.error
    (span,) = [s for s in span_exporter.get_finished_spans() if s.name == sc.SPAN_ACTION]
    assert [e.name for e in span.events].count(sc.EVENT_ACTION_RETRY) == 1
    assert span.attributes[sc.ACTION_ATTEMPTS] == 2


def test_timeout_stops_the_run_and_the_pool_recovers():
    async def main() -> None:
        config = OrchestratorConfig(action_timeout_s=0.3)
        pool = ProcessPoolManager(1)
        async with Orchestrator([pool], config=config) as orch:
            slow = await orch.submit(sleep(30))
            after = await orch.submit(sleep(0.01))
        assert slow.status is ActionStatus.TIMEOUT
        assert slow.error_type == "TimeoutError"
        assert "action_timeout_s=0.3" in slow.error
        assert after.ok

    asyncio.run(main())


def test_a_missed_deadline_ends_the_action_timeout_queued_or_running_and_frees_its_worker(
    span_exporter,
):
    async def main() -> None:
        pool = ProcessPoolManager(1)
        async with Orchestrator([pool]) as orch:
            running = asyncio.ensure_future(orch.submit(sleep(30, deadline_s=0.4)))
            await wait_for(lambda: orch.running == 1)
            queued = asyncio.ensure_future(orch.submit(sleep(0.01, deadline_s=0.2)))
            kept = asyncio.ensure_future(orch.submit(sleep(0.01, deadline_s=20)))
            late, early, ok = await asyncio.gather(running, queued, kept)
        return late, early, ok

    t0 = time.monotonic()
    late, early, ok = asyncio.run(main())
    assert time.monotonic() - t0 < 10, "the 30 s action was not stopped at its deadline"
    assert early.status is ActionStatus.TIMEOUT
    assert early.start_time is None
    assert early.error_type == "DeadlineExceeded"
    assert "deadline_s=0.2" in early.error
    assert "still queued" in early.error
    assert late.status is ActionStatus.TIMEOUT
    assert late.start_time is not None
    assert "deadline_s=0.4" in late.error
    assert "still running" in late.error
    assert 0.4 <= late.act_s < 5
    # The one worker was freed at the deadline, so the action with time left ran.
    assert ok.ok
    assert ok.start_time >= late.end_time - 0.05
    spans = {
        s.attributes[sc.ACTION_ID]: s
        for s in span_exporter.get_finished_spans()
        if s.name == sc.SPAN_ACTION
    }
    assert spans[early.action_id].attributes[sc.ERROR_TYPE] == "DeadlineExceeded"
    assert spans[late.action_id].status.status_code is StatusCode.ERROR


def test_cancel_trajectory_cancels_only_that_trajectory():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        async with Orchestrator([pool]) as orch:
            running_a = asyncio.create_task(orch.submit(sleep(30, trajectory_id="A")))
            await wait_for(lambda: orch.running == 1)
            queued = [sleep(0.05, trajectory_id=t) for t in ("A", "B", "A", "B")]
            tasks = [asyncio.create_task(orch.submit(a)) for a in queued]
            await wait_for(lambda: orch.queued == 4)
            assert await orch.cancel_trajectory("A") == 3
            results = await asyncio.gather(*tasks)
            first = await running_a

            # Queued only: the running action of trajectory C keeps going.
            running_c = asyncio.create_task(orch.submit(sleep(0.3, trajectory_id="C")))
            await wait_for(lambda: orch.running == 1)
            queued_c = asyncio.create_task(orch.submit(sleep(0.01, trajectory_id="C")))
            await wait_for(lambda: orch.queued == 1)
            assert await orch.cancel_trajectory("C", include_running=False) == 1
            kept, dropped = await running_c, await queued_c
        assert first.status is ActionStatus.CANCELLED
        assert "trajectory 'A'" in first.error
        statuses = [(r.trajectory_id, r.status) for r in results]
        assert statuses == [
            ("A", ActionStatus.CANCELLED),
            ("B", ActionStatus.OK),
            ("A", ActionStatus.CANCELLED),
            ("B", ActionStatus.OK),
        ]
        assert kept.ok
        assert dropped.status is ActionStatus.CANCELLED

    asyncio.run(main())


def test_shutdown_without_drain_cancels_everything_and_answers_everyone():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        orch = Orchestrator([pool], config=OrchestratorConfig(max_queue=2))
        tasks = [asyncio.create_task(orch.submit(sleep(30))) for _ in range(4)]
        await wait_for(lambda: orch.running == 1 and orch.queued == 2 and orch.waiting == 1)
        pids = pool.worker_pids()
        await asyncio.wait_for(orch.shutdown(drain=False), 10)
        results = await asyncio.gather(*tasks)
        late = await orch.submit(sleep(0.01))
        assert [r.status for r in results] == [ActionStatus.CANCELLED] * 4
        assert "before this action was admitted" in results[3].error
        assert late.status is ActionStatus.REJECTED
        assert "shutting down" in late.error
        assert_gone(pids)

    asyncio.run(main())


def test_shutdown_with_drain_finishes_queued_work():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        orch = Orchestrator([pool], config=OrchestratorConfig(max_queue=2))
        tasks = [asyncio.create_task(orch.submit(sleep(0.05))) for _ in range(4)]
        await wait_for(lambda: orch.running == 1 and orch.queued == 2)
        pids = pool.worker_pids()
        await orch.shutdown(drain=True)
        assert all(t.done() and t.result().ok for t in tasks)
        assert_gone(pids)

    asyncio.run(main())


def test_one_span_per_action_child_of_the_submitter(span_exporter):
    tracer = trace.get_tracer("test")

    async def main() -> tuple[int, list[ActionResult]]:
        async with Orchestrator([ProcessPoolManager(1)]) as orch:
            with tracer.start_as_current_span("test.rollout") as parent:
                results = await orch.submit_many(
                    [sleep(0.05, trajectory_id="t9"), function_action("math:sqrt", -1)]
                )
            return parent.get_span_context().span_id, results

    parent_id, (ok, bad) = asyncio.run(main())
    spans = {
        s.attributes[sc.ACTION_ID]: s
        for s in span_exporter.get_finished_spans()
        if s.name == sc.SPAN_ACTION
    }
    assert set(spans) == {ok.action_id, bad.action_id}
    for span in spans.values():
        assert span.parent is not None
        assert span.parent.span_id == parent_id
        assert span.attributes[sc.ACTION_KIND] == "process.call"
        assert span.attributes[sc.POOL_NAME] == "process"
        assert span.attributes[sc.ACTION_QUEUE_WAIT_S] >= 0.0
        assert span.attributes[sc.ACTION_UNITS] == 1
        assert sc.EVENT_ACTION_START in [e.name for e in span.events]
    good_span, bad_span = spans[ok.action_id], spans[bad.action_id]
    assert good_span.attributes[sc.ACTION_STATUS] == "ok"
    assert good_span.attributes[sc.TRAJECTORY_ID] == "t9"
    assert good_span.status.status_code is StatusCode.UNSET
    assert sc.ERROR_TYPE not in good_span.attributes
    assert bad_span.attributes[sc.ACTION_STATUS] == "error"
    assert bad_span.attributes[sc.ERROR_TYPE] == "ValueError"
    assert bad_span.status.status_code is StatusCode.ERROR
    # The second action waited for the first (one worker): its queue wait is on its span.
    assert bad_span.attributes[sc.ACTION_QUEUE_WAIT_S] == pytest.approx(bad.queue_wait_s)


def test_completion_and_queue_wait_metrics_are_recorded(metric_reader):
    async def main() -> None:
        async with Orchestrator([ProcessPoolManager(1)]) as orch:
            await orch.submit(function_action("math:sqrt", 1, kind="process.metrics"))

    asyncio.run(main())
    points: dict[str, list[object]] = {}
    for rm in metric_reader.get_metrics_data().resource_metrics:
        for scope in rm.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    for name in (sc.METRIC_ACTION_COMPLETION_TIME, sc.METRIC_ACTION_QUEUE_WAIT):
        mine = [
            p for p in points.get(name, []) if p.attributes[sc.ACTION_KIND] == "process.metrics"
        ]
        assert mine, name
        assert mine[0].count >= 1, name


def test_elastic_action_gets_spare_units_and_pool_growth_is_seen():
    async def main() -> None:
        pool = ProcessPoolManager(1, max_workers=2)
        async with Orchestrator([pool]) as orch:
            assert orch.capacity() == {"cpu": 1.0}
            await pool.scale_to(2)
            a, b = await orch.submit_many([sleep(0.3), sleep(0.3)])
            assert orch.capacity() == {"cpu": 2.0}
            assert a.start_time < b.end_time
            assert b.start_time < a.end_time

            elastic = function_action(
                SLEEP,
                0.4,
                kwargs={"parallel_fraction": 1.0},
                estimated_duration_s=0.4,
                elasticity=Elasticity(
                    min_units=1, max_units=2, speedup=Amdahl(parallel_fraction=1.0)
                ),
            )
            result = await orch.submit(elastic)
        assert result.ok
        assert result.units == 2
        assert result.output == pytest.approx(0.2)  # the function ran with units=2

    asyncio.run(main())


def test_scaling_up_an_empty_pool_starts_the_queued_actions():
    async def main() -> None:
        pool = ProcessPoolManager(0, max_workers=1)
        async with Orchestrator([pool]) as orch:
            task = asyncio.create_task(orch.submit(sleep(0.01)))
            await wait_for(lambda: orch.queued == 1)
            assert orch.health() == {"process": True}
            with pytest.raises(KeyError, match="no resource manager named 'nope'"):
                await orch.scale_to("nope", 1)
            await orch.scale_to("process", 1)  # no other event comes: scale_to must pump
            result = await asyncio.wait_for(task, 10)
        assert result.ok

    asyncio.run(main())


def test_a_manager_that_grows_on_its_own_says_so_and_the_queue_starts():
    """Capacity that changes outside the orchestrator (Serve restarting a replica, a pool
    refilling) reaches the scheduler through ``capacity_changed``: no other event is needed."""

    async def main() -> None:
        pool = ProcessPoolManager(0, max_workers=1)
        async with Orchestrator([pool]) as orch:
            task = asyncio.create_task(orch.submit(sleep(0.01)))
            await wait_for(lambda: orch.queued == 1)
            await pool.scale_to(1)  # behind the orchestrator's back
            await asyncio.sleep(0.2)
            assert orch.queued == 1  # nobody told it
            pool.capacity_changed()
            result = await asyncio.wait_for(task, 10)
        assert result.ok
        assert orch.capacity() == {"cpu": 1.0}
        pool.capacity_changed()  # after shutdown: a no-op, not an error

    asyncio.run(main())


def test_cancelling_the_submitter_cancels_the_action():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        async with Orchestrator([pool]) as orch:
            task = asyncio.create_task(orch.submit(sleep(30)))
            await wait_for(lambda: orch.running == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_for(lambda: orch.running == 0)
            assert (await orch.submit(sleep(0.01))).ok  # the worker was replaced

    asyncio.run(main())


def test_misconfigured_managers_are_refused():
    with pytest.raises(ValueError, match="at least one resource manager"):
        Orchestrator([])
    with pytest.raises(ValueError, match="distinct names"):
        Orchestrator([ProcessPoolManager(1), ProcessPoolManager(1)])
    with pytest.raises(ValueError, match=r"both provide 'cpu'.*resource="):
        Orchestrator(
            [
                ProcessPoolManager(1),
                ProcessPoolManager(1, config=ProcessPoolConfig(name="other", kinds=("x.*",))),
            ]
        )


class RefusingResizeManager(ResourceManager):
    """A manager that claims to resize running actions and refuses every resize.

    No built-in manager resizes running actions (worker processes, sandboxes and Serve
    replicas cannot be handed to a running action), so a third-party manager's refusal can only
    be exercised with one written for it. Actions run until the test releases them."""

    name = "refusing"
    kinds = frozenset({"job"})
    supports_resize = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.units: dict[str, int] = {}
        self.asked: list[tuple[str, int]] = []

    def resources(self) -> dict[str, float]:
        return {"cpu": 4.0}

    async def start(self, action: Action, units: int) -> int:
        self.units[action.id] = units
        await self.release.wait()
        return self.units[action.id]

    async def resize(self, action_id: str, units: int) -> bool:
        self.asked.append((action_id, units))
        return False

    async def cancel(self, action_id: str) -> bool:
        return False

    async def scale_to(self, n_units: int) -> None:
        raise ValueError("fixed size")

    async def shutdown(self, drain: bool = True) -> None:
        self.release.set()


def test_a_refused_resize_is_put_back_in_the_scheduler_and_on_the_span(span_exporter):
    async def main() -> None:
        manager = RefusingResizeManager()
        elastic = Action(
            id="elastic",
            kind="job",
            estimated_duration_s=40,
            elasticity=Elasticity(max_units=4, speedup=Amdahl(parallel_fraction=1.0)),
        )
        async with Orchestrator([manager]) as orch:
            first = asyncio.ensure_future(orch.submit(elastic))
            await wait_for(lambda: manager.units.get("elastic") == 4)
            second = asyncio.ensure_future(orch.submit(Action(id="rigid", kind="job")))
            await wait_for(lambda: orch.scheduler.stats.resizes_refused == 1)
            assert manager.asked == [("elastic", 3)]
            # The manager kept all 4: the scheduler counts them again, overcommitted by one.
            assert orch.scheduler.usage() == {"cpu": 5.0}
            manager.release.set()
            results = await asyncio.gather(first, second)
        assert [r.output for r in results] == [4, 1]
        assert manager.asked == [("elastic", 3)]  # never asked again

    asyncio.run(main())
    span = next(
        s
        for s in span_exporter.get_finished_spans()
        if s.name == sc.SPAN_ACTION and s.attributes[sc.ACTION_ID] == "elastic"
    )
    refused = [e for e in span.events if e.name == sc.EVENT_ACTION_RESIZE_REFUSED]
    assert len(refused) == 1
    assert refused[0].attributes[sc.ACTION_RESIZE_TARGET] == 3
    assert refused[0].attributes[sc.ACTION_UNITS] == 4
