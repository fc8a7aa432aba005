"""The asyncio orchestrator: joins one pure :class:`Scheduler` to the managers that run actions.

``await orchestrator.submit(action)`` returns the action's :class:`ActionResult`, whatever
happens: it ran (OK, ERROR, TIMEOUT), its worker kept dying (INFRA_ERROR), it was cancelled
(CANCELLED), or it could never run (REJECTED). No submitted action is dropped or turned into an
exception that loses it; that contract is what a trainer's rollout loop rests on.

How it runs. There is no polling loop: every event (a submission, an action ending, a
cancellation) calls ``_pump``, which asks ``scheduler.schedule(now)`` for a plan and carries it
out, starting each action as an asyncio task that awaits ``manager.start(action, units)``. The
scheduler stays pure; this module holds the clock (``time.monotonic``) and the I/O.

* Routing: an action goes to the first manager whose ``handles(kind)`` is true (managers are
  tried in the order given).
* Capacity: the scheduler's capacity is the union of the managers' ``resources()`` (limits:
  ``limits()``), re-read at every pump. Scale a manager through :meth:`Orchestrator.scale_to`
  (or call :meth:`Orchestrator.refresh` after scaling it yourself), so that queued actions start
  on the new units even when no other event comes. Each resource type must belong to one
  manager: the scheduler sees one pool per type, and two managers sharing ``cpu`` would let
  one's actions be counted against the other's workers.
* Backpressure: at most ``max_queue`` admitted actions wait for resources; a further
  ``submit`` waits (first come, first served) until one starts. ``submit_nowait`` raises
  :class:`QueueFull` instead. Retries after a lost worker go back to the queue without waiting,
  so that they can never deadlock behind new work.
* Retries: :class:`~tangram_core.resource_manager.WorkerLost` puts the action back in the queue
  (``scheduler.requeue``, keeping its place) up to ``max_retries`` times; any other exception is
  the action's own error and is not retried.
* Deadlines: an action whose ``deadline_s`` passes before it ends is taken out of the queue,
  or cancelled on its manager, and ends TIMEOUT with ``error_type`` ``DeadlineExceeded``: a
  result that comes too late is not worth the units it would hold.
* Telemetry: one span per action, named ``tangram.action`` (``semconv.SPAN_ACTION``) for every
  kind, a child of the submitter's current span, from submission to result. We do not use the
  GenAI ``execute_tool {tool}`` name: an action kind is not a tool name (one ``sandbox.run``
  serves many tools), and the agent loop that knows the tool and its call id owns that span;
  the action span is its child. Each start and retry is an event on the span; the manager's
  own spans (if any) are children of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

from tangram_core import semconv as sc
from tangram_core.actions import Action, ActionResult, ActionStatus, QueueFull
from tangram_core.elastic_scheduler import ElasticConfig, ElasticScheduler
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost
from tangram_core.scheduler import ActionSpec, CapacityError, Scheduler
from tangram_core.telemetry import get_meter, get_tracer

__all__ = [
    "DeadlineExceeded",
    "Orchestrator",
    "OrchestratorConfig",
    "QueueFull",
    "UnknownActionKind",
]

logger = logging.getLogger(__name__)

_FAILED = frozenset(
    {ActionStatus.ERROR, ActionStatus.INFRA_ERROR, ActionStatus.TIMEOUT, ActionStatus.REJECTED}
)


class OrchestratorConfig(BaseModel):
    """Runtime policy of an :class:`Orchestrator`; every field has a safe default."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_queue: int = Field(
        10_000,
        ge=1,
        description="Most admitted actions waiting for resources; submit() waits while the "
        "queue is full (backpressure) and submit_nowait() raises QueueFull.",
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="Retries after the worker running an action died (WorkerLost); an action "
        "runs at most 1 + max_retries times, then ends INFRA_ERROR.",
    )
    action_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest one run may take, from its start on a manager; past it the run is "
        "cancelled and the action ends TIMEOUT (not retried). None: no limit.",
    )


class DeadlineExceeded(TimeoutError):
    """An action's ``deadline_s`` passed before it ended: its result would come too late to use.

    It ends with status TIMEOUT and this ``error_type``, wherever it was: a queued action leaves
    the queue, a running one is cancelled on its manager, so that late work frees its units for
    actions whose results are still wanted.
    """


class UnknownActionKind(LookupError):
    """No manager handles an action's kind; reported as a REJECTED result, never raised."""


class _AdmissionGate:
    """FIFO backpressure over the queue's ``limit`` slots.

    A freed slot goes straight to the longest-waiting submitter, so late arrivals never
    overtake; ``close()`` turns every waiter away (they return CANCELLED)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters and not self._closed:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> bool:
        """True once a slot is ours; False if the gate closed first."""
        if self._closed:
            return False
        if self.try_acquire():
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # granted, but our caller went away: pass the slot on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    def close(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


@dataclass(eq=False, slots=True)
class _Record:
    """Runtime state of one admitted action (mutable; only the event loop touches it)."""

    action: Action
    manager: ResourceManager
    future: asyncio.Future[ActionResult]
    span: Span
    submit_time: float
    start_time: float | None = None  # of the latest attempt
    units: int = 0
    attempts: int = 0
    task: asyncio.Task[None] | None = None
    holds_slot: bool = True  # counts against max_queue until it first starts
    running: bool = False  # started; the scheduler holds its units
    resolved: bool = False
    cancel_reason: str | None = None
    deadline: asyncio.TimerHandle | None = None
    resizing: asyncio.Lock | None = None  # resizes reach the manager one at a time, in order
    resize_refused: bool = False
    missed: DeadlineExceeded | None = None  # set when the deadline cancelled it


class Orchestrator:
    """Runs actions on resource managers in the order and sizes a scheduler decides.

    Use it as ``async with Orchestrator([ProcessPoolManager(4)]) as orch:``; leaving the block
    drains (or, on an exception, cancels) the remaining work and shuts the managers down.
    With no ``scheduler``, an :class:`ElasticScheduler` is built over the managers' capacity;
    it resizes running actions only if every manager supports resizing.
    """

    def __init__(
        self,
        managers: Sequence[ResourceManager],
        scheduler: Scheduler | None = None,
        config: OrchestratorConfig | None = None,
    ) -> None:
        if not managers:
            raise ValueError(
                "Orchestrator needs at least one resource manager, e.g. [ProcessPoolManager(4)]"
            )
        self.config = config or OrchestratorConfig()
        self._managers = tuple(managers)
        _check_managers(self._managers)
        for manager in self._managers:
            manager.on_capacity_change = self.refresh
        capacity, limits = self._capacity()
        if scheduler is None:
            resize = all(m.supports_resize for m in self._managers)
            scheduler = ElasticScheduler(
                capacity, config=ElasticConfig(resize_running=resize), limits=limits
            )
        else:
            scheduler.set_capacity(capacity, limits)
        self.scheduler = scheduler
        self._seen_capacity = (capacity, limits)
        self._routes: dict[str, ResourceManager | None] = {}
        self._records: dict[str, _Record] = {}
        self._queued: dict[str, _Record] = {}
        self._running: dict[str, _Record] = {}
        self._gate = _AdmissionGate(self.config.max_queue)
        self._background: set[asyncio.Task[Any]] = set()
        self._inflight = 0  # submit() calls that have not returned
        self._progress = asyncio.Event()  # pulsed whenever an action or a submit call ends
        self._opened = False
        self._closing = False
        self._shut_down = asyncio.Event()
        self._tracer = get_tracer()
        meter = get_meter()
        self._act_hist = meter.create_histogram(
            sc.METRIC_ACTION_COMPLETION_TIME,
            unit="s",
            description="Action completion time: from submission to result.",
            explicit_bucket_boundaries_advisory=sc.SECONDS_BUCKETS,
        )
        self._wait_hist = meter.create_histogram(
            sc.METRIC_ACTION_QUEUE_WAIT,
            unit="s",
            description="From submission to the start of the action's last run; recorded when "
            "it ends, for every action that started.",
            explicit_bucket_boundaries_advisory=sc.SECONDS_BUCKETS,
        )
        self._scale_events = meter.create_counter(
            sc.METRIC_SCALE_EVENTS, description="Pool resizes requested, by manager and direction."
        )
        self.name = f"orchestrator-{next(_names)}"
        _LIVE.add(self)
        _ensure_gauges()

    # -- queries ---------------------------------------------------------------------------------

    @property
    def managers(self) -> tuple[ResourceManager, ...]:
        return self._managers

    @property
    def queued(self) -> int:
        """Admitted actions waiting for resources (including retries)."""
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """``submit`` calls held back by backpressure, not yet admitted."""
        return self._gate.waiting

    def capacity(self) -> dict[str, float]:
        return self.scheduler.capacity()

    def health(self) -> dict[str, bool]:
        """Each manager's ``health()``, by name."""
        return {m.name: m.health() for m in self._managers}

    def manager_for(self, kind: str) -> ResourceManager | None:
        """The manager that runs actions of ``kind`` (the first whose ``handles`` says so)."""
        if kind not in self._routes:
            self._routes[kind] = next((m for m in self._managers if m.handles(kind)), None)
        return self._routes[kind]

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open every manager (start workers); ``submit`` does it on first use otherwise."""
        if not self._opened:
            self._opened = True
            await asyncio.gather(*(m.open() for m in self._managers))

    async def __aenter__(self) -> Orchestrator:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        await self.shutdown(drain=exc_type is None)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting actions, settle every one in flight, then shut the managers down.

        ``drain=True`` runs everything already submitted (including ``submit`` calls waiting
        on backpressure) to its result. ``drain=False`` ends queued and waiting actions
        CANCELLED and cancels running ones (their workers are stopped). Either way each
        ``submit`` returns a result; later ones are REJECTED. Safe to call twice."""
        if self._closing:
            await self._shut_down.wait()
            return
        self._closing = True
        try:
            if drain:
                while self._inflight or self._records:
                    self._progress.clear()
                    await self._progress.wait()
            else:
                self._gate.close()
                records = list(self._records.values())
                for record in records:
                    self._cancel(record, "the orchestrator shut down (drain=False)")
                if records:
                    await asyncio.wait([r.future for r in records])
            outcomes = await asyncio.gather(
                *(m.shutdown(drain) for m in self._managers), return_exceptions=True
            )
            for manager, outcome in zip(self._managers, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    logger.error("manager %r failed to shut down: %r", manager.name, outcome)
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
        finally:
            self._shut_down.set()

    async def scale_to(self, manager: str, n_units: int) -> None:
        """Scale the manager named ``manager`` and start queued work on any new units."""
        by_name = {m.name: m for m in self._managers}
        if manager not in by_name:
            raise KeyError(f"no resource manager named {manager!r}; have {sorted(by_name)}")
        before = by_name[manager].resources()
        await by_name[manager].scale_to(n_units)
        after = by_name[manager].resources()
        direction = "up" if sum(after.values()) > sum(before.values()) else "down"
        self._scale_events.add(1, {sc.POOL_NAME: manager, "direction": direction})
        self.refresh()

    def refresh(self) -> None:
        """Re-read the managers' capacity and start what now fits; call it after scaling a
        manager directly (``scale_to`` does it for you)."""
        if not self._shut_down.is_set():
            self._pump()

    # -- submission ------------------------------------------------------------------------------

    async def submit(self, action: Action) -> ActionResult:
        """Run ``action`` and return its result; never raises for the action's sake.

        Waits while ``max_queue`` actions are queued (backpressure). The result's
        ``submit_time`` is this call's start, so its ACT includes any such wait. Cancelling
        the caller cancels the action."""
        submit_time = time.monotonic()
        parent = otel_context.get_current()
        manager = self._route(action, parent, submit_time)
        if isinstance(manager, ActionResult):
            return manager  # REJECTED: no manager can run it
        span = self._open_span(action, parent, manager)
        self._inflight += 1
        try:
            if not await self._gate.acquire():
                return self._conclude(
                    action,
                    span,
                    submit_time,
                    ActionStatus.CANCELLED,
                    error="the orchestrator shut down (drain=False) before this action was "
                    "admitted to the queue",
                )
            if not self._opened:
                await self.open()
            admitted = self._admit(action, manager, span, submit_time)
            if isinstance(admitted, ActionResult):
                return admitted
            try:
                return await asyncio.shield(admitted.future)
            except asyncio.CancelledError:
                self._cancel(admitted, "its submitter was cancelled")
                raise
        finally:
            self._inflight -= 1
            self._progress.set()

    def submit_nowait(self, action: Action) -> asyncio.Future[ActionResult]:
        """Admit ``action`` now and return a future of its result.

        Raises :class:`QueueFull` (and admits nothing) when ``max_queue`` actions are queued.
        Cancelling the returned future cancels the action. Call it from the event loop."""
        submit_time = time.monotonic()
        parent = otel_context.get_current()
        loop = asyncio.get_running_loop()
        manager = self._route(action, parent, submit_time)
        if isinstance(manager, ActionResult):
            done: asyncio.Future[ActionResult] = loop.create_future()
            done.set_result(manager)
            return done
        if not self._gate.try_acquire():
            raise QueueFull(
                f"{self.queued} actions are queued (max_queue={self.config.max_queue}); await "
                f"submit() to wait for room, or raise OrchestratorConfig.max_queue"
            )
        span = self._open_span(action, parent, manager)
        admitted = self._admit(action, manager, span, submit_time)
        if isinstance(admitted, ActionResult):
            done = loop.create_future()
            done.set_result(admitted)
            return done
        if not self._opened:  # opening is async; the first start waits for it in the manager
            self._opened = True
            self._spawn_background(self._open_managers())
        record = admitted

        def _on_done(future: asyncio.Future[ActionResult]) -> None:
            if future.cancelled():
                self._cancel(record, "its future was cancelled")

        record.future.add_done_callback(_on_done)
        return record.future

    async def submit_many(self, actions: Iterable[Action]) -> list[ActionResult]:
        """Submit all, concurrently and in order; results come back in the same order."""
        return list(await asyncio.gather(*(self.submit(a) for a in actions)))

    async def cancel(self, action_id: str) -> bool:
        """Cancel one queued or running action; it ends CANCELLED. False if it is not in
        flight (unknown, or already finished)."""
        record = self._records.get(action_id)
        if record is None or not self._cancel(record, "cancelled by request"):
            return False
        await asyncio.wait([record.future])
        return True

    def end_trajectory(self, trajectory_id: str) -> None:
        """The trajectory is over: the scheduler frees anything it held for it. Action-level
        scheduling holds nothing, but trajectory-bound baselines (static leases) need it."""
        self.scheduler.trajectory_done(trajectory_id, time.monotonic())
        self._pump()

    async def cancel_trajectory(self, trajectory_id: str, *, include_running: bool = True) -> int:
        """Cancel the trajectory's actions that are queued and, unless ``include_running`` is
        False, running; returns how many. Others are untouched. Returns once every cancelled
        action has its CANCELLED result. With ``include_running`` the trajectory is taken as
        over, and the scheduler is told (``trajectory_done``)."""
        records = [
            r
            for r in list(self._records.values())
            if r.action.trajectory_id == trajectory_id
            and (include_running or r.action.id in self._queued)
        ]
        cancelled = [
            r for r in records if self._cancel(r, f"trajectory {trajectory_id!r} was cancelled")
        ]
        if include_running:
            self.end_trajectory(trajectory_id)
        if cancelled:
            await asyncio.wait([r.future for r in cancelled])
        return len(cancelled)

    # -- internals: admission --------------------------------------------------------------------

    def _route(
        self, action: Action, parent: otel_context.Context, submit_time: float
    ) -> ResourceManager | ActionResult:
        """The manager for ``action``, or a REJECTED result saying why there is none."""
        if self._closing:
            error: Exception = RuntimeError(
                "the orchestrator is shutting down; submit actions before shutdown()"
            )
            span = self._open_span(action, parent, None)
            return self._conclude(action, span, submit_time, ActionStatus.REJECTED, exc=error)
        manager = self.manager_for(action.kind)
        if manager is None:
            error = UnknownActionKind(
                f"no resource manager handles action kind {action.kind!r} (action "
                f"{action.id!r}); known kinds: {self._known_kinds()}. Add a manager whose "
                f"kinds match it, or fix the kind"
            )
            span = self._open_span(action, parent, None)
            return self._conclude(action, span, submit_time, ActionStatus.REJECTED, exc=error)
        provided = set(manager.limits())
        missing = sorted(set(action.demand) - provided)
        if missing:
            error = CapacityError(
                f"action {action.id!r} ({action.kind}) goes to manager {manager.name!r}, which "
                f"provides {sorted(provided)}, but it demands {missing}; use demand over "
                f"{sorted(provided)} or route the kind to a manager that has {missing}"
            )
            span = self._open_span(action, parent, manager)
            return self._conclude(action, span, submit_time, ActionStatus.REJECTED, exc=error)
        return manager

    def _admit(
        self,
        action: Action,
        manager: ResourceManager,
        span: Span,
        submit_time: float,
    ) -> _Record | ActionResult:
        """Queue an action that holds a gate slot; a REJECTED result if the scheduler refuses."""
        if action.id in self._records:
            self._gate.release()
            error = ValueError(
                f"action {action.id!r} is already in flight; every action needs a unique id "
                f"(leave Action.id unset to get one)"
            )
            return self._conclude(action, span, submit_time, ActionStatus.REJECTED, exc=error)
        self._refresh_capacity()
        try:
            self.scheduler.submit(ActionSpec.from_action(action), time.monotonic())
        except CapacityError as exc:
            self._gate.release()
            return self._conclude(action, span, submit_time, ActionStatus.REJECTED, exc=exc)
        future: asyncio.Future[ActionResult] = asyncio.get_running_loop().create_future()
        record = _Record(action, manager, future, span, submit_time)
        self._records[action.id] = record
        self._queued[action.id] = record
        if action.deadline_s is not None:
            record.deadline = asyncio.get_running_loop().call_at(
                submit_time + action.deadline_s, self._on_deadline, record
            )
        self._pump()
        return record

    def _on_deadline(self, record: _Record) -> None:
        """The deadline passed: end the action TIMEOUT wherever it is (queued or running)."""
        if record.resolved or record.cancel_reason is not None:
            return  # already ending for another reason, which its result keeps
        action = record.action
        where = "still queued" if action.id in self._queued else "still running"
        missed = DeadlineExceeded(
            f"action {action.id!r} ({action.kind}) missed its deadline_s={action.deadline_s:g}: "
            f"it was {where} after {time.monotonic() - record.submit_time:.3g}s; raise "
            f"deadline_s, add capacity, or give it a higher priority"
        )
        record.missed = missed
        self._cancel(record, str(missed))

    # -- internals: the loop ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Ask the scheduler what to do now and do it; called after every event."""
        self._refresh_capacity()
        now = time.monotonic()
        plan = self.scheduler.schedule(now)
        for start in plan.starts:
            self._start(self._queued.pop(start.action_id), start.units, now)
        for resize in plan.resizes:
            record = self._running.get(resize.action_id)
            if record is not None:
                self._spawn_background(self._resize(record, resize.units))

    def _start(self, record: _Record, units: int, now: float) -> None:
        if record.holds_slot:
            record.holds_slot = False
            self._gate.release()
        record.running = True
        record.attempts += 1
        record.units = units
        record.start_time = now
        self._running[record.action.id] = record
        record.span.add_event(
            sc.EVENT_ACTION_START, {sc.ACTION_ATTEMPTS: record.attempts, sc.ACTION_UNITS: units}
        )
        # The task runs with the action span current, so the manager's spans are its children.
        context = contextvars.copy_context()
        context.run(otel_context.attach, trace.set_span_in_context(record.span))
        record.task = asyncio.create_task(
            self._run(record, units), name=f"tangram-action-{record.action.id}", context=context
        )
        record.task.add_done_callback(functools.partial(self._on_task_done, record))

    async def _run(self, record: _Record, units: int) -> None:
        """One attempt: await the manager and turn what happened into the next step."""
        timeout = self.config.action_timeout_s
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                output = await record.manager.start(record.action, units)
        except WorkerLost as exc:
            self._on_worker_lost(record, exc)
        except asyncio.CancelledError:
            self._end_attempt(record, ActionStatus.CANCELLED)
        except TimeoutError as exc:
            if scope.expired() and record.cancel_reason is None:
                error = TimeoutError(
                    f"action {record.action.id!r} ({record.action.kind}) ran longer than "
                    f"action_timeout_s={timeout:g}s and was stopped; raise the timeout or "
                    f"shorten the action"
                )
                self._end_attempt(record, ActionStatus.TIMEOUT, exc=error)
            else:
                self._end_attempt(record, ActionStatus.ERROR, exc=exc)
        except Exception as exc:
            self._end_attempt(record, ActionStatus.ERROR, exc=exc)
        else:
            self._end_attempt(record, ActionStatus.OK, output=output)

    def _on_task_done(self, record: _Record, task: asyncio.Task[None]) -> None:
        """Safety net: a task cancelled before it ran, or one that escaped ``_run``'s handling,
        still ends its action with a result."""
        if not record.running or record.task is not task:
            return
        if task.cancelled():
            self._end_attempt(record, ActionStatus.CANCELLED)
            return
        exc = task.exception()
        logger.error("action %r: its run ended unexpectedly: %r", record.action.id, exc)
        if not isinstance(exc, Exception):
            exc = RuntimeError(f"the run ended with {exc!r}")
        self._end_attempt(record, ActionStatus.ERROR, exc=exc)

    def _end_attempt(
        self,
        record: _Record,
        status: ActionStatus,
        *,
        output: Any = None,
        exc: Exception | None = None,
    ) -> None:
        if not record.running:
            return
        record.running = False
        del self._running[record.action.id]
        self.scheduler.complete(
            record.action.id, time.monotonic(), succeeded=status is ActionStatus.OK
        )
        if record.cancel_reason is not None and status is not ActionStatus.OK:
            status, exc = ActionStatus.CANCELLED, None
        self._resolve(record, status, output=output, exc=exc)
        self._pump()

    def _on_worker_lost(self, record: _Record, exc: WorkerLost) -> None:
        attempts, budget = record.attempts, self.config.max_retries
        if record.cancel_reason is not None or attempts > budget:
            if record.cancel_reason is None:
                exc = WorkerLost(
                    f"the worker running action {record.action.id!r} ({record.action.kind}) died "
                    f"on each of {attempts} attempt(s) (max_retries={budget}); last: {exc}",
                    action_id=exc.action_id,
                    pid=exc.pid,
                    exitcode=exc.exitcode,
                )
            self._end_attempt(record, ActionStatus.INFRA_ERROR, exc=exc)
            return
        logger.warning(
            "action %r: worker lost on attempt %d of %d; retrying: %s",
            record.action.id,
            attempts,
            budget + 1,
            exc,
        )
        record.running = False
        del self._running[record.action.id]
        record.span.add_event(
            sc.EVENT_ACTION_RETRY,
            {sc.ERROR_TYPE: type(exc).__name__, sc.ACTION_ATTEMPTS: attempts},
        )
        self.scheduler.requeue(record.action.id, time.monotonic())
        self._queued[record.action.id] = record
        self._pump()

    def _cancel(self, record: _Record, reason: str) -> bool:
        """Cancel an action wherever it is; False if it already ended or is being cancelled.
        A queued one ends now; a running one ends when its manager has stopped it."""
        if record.resolved or record.cancel_reason is not None:
            return False
        record.cancel_reason = reason
        if record.action.id in self._queued:
            del self._queued[record.action.id]
            self.scheduler.cancel(record.action.id)
            if record.holds_slot:
                record.holds_slot = False
                self._gate.release()
            self._resolve(record, ActionStatus.CANCELLED)
            self._pump()
        elif record.running:
            self._spawn_background(record.manager.cancel(record.action.id))
            if record.task is not None:
                record.task.cancel()
        return True

    async def _resize(self, record: _Record, units: int) -> None:
        """Carry out one resize of the plan. A refusal (or an error) is reported back to the
        scheduler with the units the action still has, so that its accounting stays true: it
        would otherwise count units that were never handed over, or lend out units the action
        still holds."""
        if record.resizing is None:
            record.resizing = asyncio.Lock()
        async with record.resizing:
            if record.resize_refused or not record.running:
                return  # the scheduler has stopped resizing it, or it ended meanwhile
            try:
                accepted = await record.manager.resize(record.action.id, units)
            except Exception:
                logger.exception("resize of action %r to %d units failed", record.action.id, units)
                accepted = False
            if accepted:
                record.units = units
                return
            if not record.running:
                return
            record.resize_refused = True
            record.span.add_event(
                sc.EVENT_ACTION_RESIZE_REFUSED,
                {sc.ACTION_UNITS: record.units, sc.ACTION_RESIZE_TARGET: units},
            )
            self.scheduler.resize_refused(record.action.id, record.units, time.monotonic())
            self._pump()

    async def _open_managers(self) -> None:
        await asyncio.gather(*(m.open() for m in self._managers))

    def _spawn_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _capacity(self) -> tuple[dict[str, float], dict[str, float]]:
        capacity: dict[str, float] = {}
        limits: dict[str, float] = {}
        for manager in self._managers:
            capacity.update(manager.resources())
            limits.update(manager.limits())
        for resource, amount in capacity.items():
            limits[resource] = max(limits.get(resource, 0.0), amount)
        for resource in limits:
            capacity.setdefault(resource, 0.0)
        return capacity, limits

    def _refresh_capacity(self) -> None:
        seen = self._capacity()
        if seen != self._seen_capacity:
            self._seen_capacity = seen
            self.scheduler.set_capacity(*seen)

    def _known_kinds(self) -> str:
        return "; ".join(
            f"{m.name}: {sorted(m.kinds) if m.kinds else 'custom handles()'}"
            for m in self._managers
        )

    # -- internals: results and telemetry --------------------------------------------------------

    def _open_span(
        self, action: Action, parent: otel_context.Context, manager: ResourceManager | None
    ) -> Span:
        attributes: dict[str, str | int] = {
            sc.ACTION_ID: action.id,
            sc.ACTION_KIND: action.kind,
        }
        if action.trajectory_id is not None:
            attributes[sc.TRAJECTORY_ID] = action.trajectory_id
        if action.step_id is not None:
            attributes[sc.STEP_ID] = action.step_id
        if manager is not None:
            attributes[sc.POOL_NAME] = manager.name
        return self._tracer.start_span(
            sc.SPAN_ACTION, context=parent, kind=SpanKind.INTERNAL, attributes=attributes
        )

    def _resolve(
        self,
        record: _Record,
        status: ActionStatus,
        *,
        output: Any = None,
        exc: Exception | None = None,
    ) -> None:
        if record.resolved:
            return
        record.resolved = True
        self._records.pop(record.action.id, None)
        if record.deadline is not None:
            record.deadline.cancel()
        if record.missed is not None and status is ActionStatus.CANCELLED:
            status, exc = ActionStatus.TIMEOUT, record.missed
        if status is ActionStatus.CANCELLED:
            error = f"cancelled: {record.cancel_reason or 'its run was cancelled'}"
        else:
            error = None
        result = self._conclude(
            record.action,
            record.span,
            record.submit_time,
            status,
            output=output,
            exc=exc,
            error=error,
            start_time=record.start_time,
            units=record.units,
            attempts=record.attempts,
        )
        if not record.future.done():
            record.future.set_result(result)
        self._progress.set()

    def _conclude(
        self,
        action: Action,
        span: Span,
        submit_time: float,
        status: ActionStatus,
        *,
        output: Any = None,
        exc: Exception | None = None,
        error: str | None = None,
        start_time: float | None = None,
        units: int = 0,
        attempts: int = 0,
    ) -> ActionResult:
        """Build the result, finish the action's span and record its metrics."""
        error_type = None
        if exc is not None:
            error = error or str(exc) or type(exc).__name__
            error_type = exc.error_type if isinstance(exc, ActionError) else type(exc).__name__
        result = ActionResult(
            action_id=action.id,
            kind=action.kind,
            status=status,
            output=output,
            error=error,
            error_type=error_type,
            submit_time=submit_time,
            start_time=start_time,
            end_time=time.monotonic(),
            units=units,
            attempts=attempts,
            trajectory_id=action.trajectory_id,
        )
        span.set_attribute(sc.ACTION_STATUS, status.value)
        span.set_attribute(sc.ACTION_UNITS, units)
        span.set_attribute(sc.ACTION_ATTEMPTS, attempts)
        span.set_attribute(sc.ACTION_QUEUE_WAIT_S, result.queue_wait_s)
        if status in _FAILED:
            span.set_attribute(sc.ERROR_TYPE, error_type or status.value)
            span.set_status(Status(StatusCode.ERROR, error))
            if exc is not None and status is ActionStatus.ERROR:
                span.record_exception(exc)
        span.end()
        if start_time is not None:
            self._wait_hist.record(result.queue_wait_s, {sc.ACTION_KIND: action.kind})
        self._act_hist.record(
            result.act_s, {sc.ACTION_KIND: action.kind, sc.ACTION_STATUS: status.value}
        )
        return result


# -- process-wide gauges ------------------------------------------------------------------------
# OpenTelemetry keeps the first registration of an instrument name, so the gauges exist once
# per process and report every live orchestrator, each under its own name. They are read when
# the SDK collects, so they cost nothing on the hot path.

_LIVE: weakref.WeakSet[Orchestrator] = weakref.WeakSet()
_names = itertools.count()
_gauges_made = False


def _observe_queue(_options: CallbackOptions) -> Iterable[Observation]:
    for orch in list(_LIVE):
        yield Observation(orch.scheduler.queued, {sc.ORCHESTRATOR: orch.name})


def _observe_utilisation(_options: CallbackOptions) -> Iterable[Observation]:
    for orch in list(_LIVE):
        usage, cap = orch.scheduler.usage(), orch.scheduler.capacity()
        for resource, total in cap.items():
            if total > 0:
                attrs = {sc.ORCHESTRATOR: orch.name, sc.RESOURCE_TYPE: resource}
                yield Observation(usage.get(resource, 0.0) / total, attrs)


def _observe_capacity(_options: CallbackOptions) -> Iterable[Observation]:
    for orch in list(_LIVE):
        for resource, total in orch.scheduler.capacity().items():
            yield Observation(total, {sc.ORCHESTRATOR: orch.name, sc.RESOURCE_TYPE: resource})


def _ensure_gauges() -> None:
    global _gauges_made
    if _gauges_made:
        return
    _gauges_made = True
    meter = get_meter()
    meter.create_observable_gauge(
        sc.METRIC_QUEUE_LENGTH,
        callbacks=[_observe_queue],
        description="Actions admitted and waiting for units.",
    )
    meter.create_observable_gauge(
        sc.METRIC_RESOURCE_UTILISATION,
        callbacks=[_observe_utilisation],
        unit="1",
        description="Share of each resource type's capacity in use.",
    )
    meter.create_observable_gauge(
        sc.METRIC_POOL_CAPACITY,
        callbacks=[_observe_capacity],
        description="Units each resource type has now.",
    )


def _check_managers(managers: Sequence[ResourceManager]) -> None:
    """Distinct names, and each resource type provided by one manager only (see module doc)."""
    names = [m.name for m in managers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"resource managers need distinct names; {duplicates} appear twice")
    owner: dict[str, str] = {}
    for manager in managers:
        for resource in set(manager.resources()) | set(manager.limits()):
            if resource in owner:
                raise ValueError(
                    f"resource managers {owner[resource]!r} and {manager.name!r} both provide "
                    f"{resource!r}; the scheduler sees one pool per resource type, so give each "
                    f"manager its own resource name (e.g. ProcessPoolConfig(resource="
                    f"'{resource}.{manager.name}')) and use it in those actions' demand"
                )
            owner[resource] = manager.name
