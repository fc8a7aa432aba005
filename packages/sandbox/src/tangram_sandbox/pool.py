"""The warm sandbox pool: zygote workers, a bounded queue, scaling, and the async API.

Why one request per worker at a time: a worker is one CPU slot under one uid, which is the
unit tangram-core schedules (one ``cpu`` per unit of demand). The pool itself runs no user
code; it validates requests, hands them to workers, judges test outputs (expected outputs
never enter a sandbox) and turns every infrastructure failure into ``sandbox_error``.

Three modules, one job each: this one owns the workers (start, watch, replace, scale) and
dispatches requests to them through its bounded queue; :mod:`.conversation` is the protocol a
request speaks with the worker it got; :mod:`.verdicts` turns the worker's reports into results.

Who queues: the pool's queue (``max_queue``) serves its direct callers (the HTTP server,
``tangram-sandbox run``, ``pool.run``). Under tangram-core the orchestrator queues: it starts an
action only on a unit it counts as free, and units are warm workers, so its actions find a
worker at once and the pool's queue stays empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Status, StatusCode

from tangram_core import semconv
from tangram_core.actions import QueueFull  # the orchestrator's too: one name to catch
from tangram_core.telemetry import get_tracer
from tangram_sandbox import metrics as pool_metrics
from tangram_sandbox import wire
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.conversation import Conversation
from tangram_sandbox.isolation import Capabilities, capabilities
from tangram_sandbox.models import (
    Limits,
    RunRequest,
    RunResult,
    RunStatus,
    RunTestsRequest,
    RunTestsResult,
    TestVerdict,
)
from tangram_sandbox.verdicts import judge, merge_shares, not_compiled, run_tests_result, to_result
from tangram_sandbox.worker import SlotLeases, WorkerDied, ZygoteWorker

__all__ = ["QueueFull", "SandboxPool", "SandboxUnavailable"]

logger = logging.getLogger(__name__)
_MAX_START_FAILURES = 3


class SandboxUnavailable(RuntimeError):
    """The pool cannot run anything: isolation refused (strict mode), or workers fail to start."""


class SandboxPool:
    """A pool of warm zygote workers. Use ``async with SandboxPool(config) as pool``."""

    def __init__(self, config: PoolConfig | None = None, **overrides: Any) -> None:
        self.config = config or PoolConfig(**overrides)
        if config is not None and overrides:
            self.config = config.model_copy(update=overrides)
        self._workers: set[ZygoteWorker] = set()
        self._idle: collections.deque[ZygoteWorker] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[ZygoteWorker]] = collections.deque()
        self._starting = 0
        self._target = self.config.min_workers
        self._closed = False
        self._start_failures = 0
        self._broken: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leases: SlotLeases | None = None
        self._apply: dict[str, bool] = {}
        self.caps: Capabilities | None = None
        self.replaced = 0  # workers replaced after dying
        self._talk = Conversation(self.config)
        pool_metrics.watch(self)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> SandboxPool:
        """Check isolation, then start ``min_workers`` and wait until they are warm."""
        loop = asyncio.get_running_loop()
        caps = await loop.run_in_executor(
            None, capabilities, self.config.python, self.config.uid_base
        )
        self.caps = caps
        missing = [
            m for m in caps.missing() if not (m.startswith("cgroup") and not self.config.cgroups)
        ]
        if missing and self.config.isolation == "strict":
            raise SandboxUnavailable(
                "isolation='strict' but these layers are unavailable: "
                + ", ".join(f"{m} ({caps.layer(m).detail})" for m in missing)
            )
        if missing:
            msg = (
                "sandbox pool runs WITHOUT these isolation layers: "
                + ", ".join(f"{m} ({caps.layer(m).detail})" for m in missing)
                + "; pass isolation='strict' to refuse instead"
            )
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if not caps.available("mount_ns") or not caps.available("private_tmp"):
            raise SandboxUnavailable(
                "the sandbox needs a mount namespace and tmpfs for each execution's private "
                f"working directory: {caps.layer('mount_ns').detail}"
            )
        self._apply = {
            name: caps.available(name)
            for name in ("slot_uid", "user_ns", "seccomp", "pid_ns", "mount_ns", "ipc_ns")
        }
        use = {
            "memory": self.config.cgroups and caps.available("cgroup_memory"),
            "pids": self.config.cgroups and caps.available("cgroup_pids"),
        }
        os.makedirs(self.config.cache_dir, mode=0o700, exist_ok=True)
        self._leases = SlotLeases(self.config, use)
        self._fill()
        await self._wait_warm(self.config.min_workers)
        return self

    async def __aenter__(self) -> SandboxPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, drain: bool = True) -> None:
        """Stop accepting work; with ``drain`` let running executions finish, then stop workers."""
        self._closed = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(SandboxUnavailable("sandbox pool closed"))
        self._waiters.clear()
        if not drain:
            for worker in list(self._workers):
                worker.kill()
        deadline = time.monotonic() + self.config.max_limits.wall_s + self.config.grace_s
        while any(w.busy for w in self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        for worker in list(self._workers):
            await self._retire(worker)

    # --- size ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Workers that are up (busy or idle)."""
        return len(self._workers)

    @property
    def busy(self) -> int:
        return sum(1 for w in self._workers if w.busy)

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._waiters)

    @property
    def target(self) -> int:
        return self._target

    def healthy(self) -> bool:
        return self._broken is None and not self._closed and self.size >= self._target

    async def scale_to(self, n: int) -> None:
        """Grow or shrink to ``n`` workers (at least ``min_workers``). Busy workers that are
        over the target leave when their execution ends; nothing running is interrupted."""
        if n > self.config.max_workers or n < 0:
            raise ValueError(f"scale_to({n}) outside [0, max_workers={self.config.max_workers}]")
        self._target = max(n, self.config.min_workers)
        self._fill()
        while len(self._workers) > self._target and self._idle:
            await self._retire(self._idle.pop())

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the pool holds its target number of warm workers."""
        await asyncio.wait_for(self._wait_warm(self._target), timeout)

    async def _wait_warm(self, n: int) -> None:
        while len(self._workers) < n:
            if self._broken:
                raise SandboxUnavailable(self._broken)
            await asyncio.sleep(0.005)

    def _fill(self) -> None:
        if self._closed or self._broken:
            return
        while len(self._workers) + self._starting < self._target:
            self._starting += 1
            self._spawn_task(self._start_worker())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_worker(self) -> None:
        assert self._leases is not None
        slot = self._leases.acquire()
        try:
            worker = await ZygoteWorker.start(self.config, slot, self._apply)
        except (WorkerDied, OSError) as exc:
            await self._leases.release(slot)
            self._starting -= 1
            self._start_failures += 1
            logger.error("sandbox worker failed to start: %s", exc)
            if self._start_failures >= _MAX_START_FAILURES:
                self._broken = (
                    f"{_MAX_START_FAILURES} sandbox workers in a row failed to start: {exc}"
                )
                for fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(SandboxUnavailable(self._broken))
                self._waiters.clear()
            else:
                self._fill()
            return
        self._starting -= 1
        self._start_failures = 0
        self._workers.add(worker)
        self._watch(worker)
        if self._closed:
            await self._retire(worker)
            return
        self._release(worker)

    def _watch(self, worker: ZygoteWorker) -> None:
        """Notice a worker's death at once, even while idle, and replace it."""
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(worker.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            worker.dead = True
            if worker in self._workers and not worker.busy:
                self._spawn_task(self._retire(worker, replaced=True))

        loop.add_reader(pidfd, on_exit)

    async def _retire(self, worker: ZygoteWorker, replaced: bool = False) -> None:
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        if replaced and not self._closed:
            self.replaced += 1
        await worker.close()
        assert self._leases is not None
        await self._leases.release(worker.slot)
        self._fill()

    # --- dispatch -----------------------------------------------------------------------------

    def _release(self, worker: ZygoteWorker) -> None:
        worker.busy = False
        if worker.dead or len(self._workers) > self._target:
            self._spawn_task(self._retire(worker, replaced=worker.dead))
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                worker.busy = True
                fut.set_result(worker)
                return
        self._idle.append(worker)

    @contextlib.asynccontextmanager
    async def _worker(self) -> AsyncIterator[ZygoteWorker]:
        if self._closed:
            raise SandboxUnavailable("sandbox pool is closed")
        if self._broken:
            raise SandboxUnavailable(self._broken)
        while self._idle and self._idle[0].dead:
            self._spawn_task(self._retire(self._idle.popleft(), replaced=True))
        if self._idle:
            worker = self._idle.popleft()
            worker.busy = True
        else:
            if len(self._waiters) >= self.config.max_queue:
                raise QueueFull(
                    f"sandbox queue is full ({len(self._waiters)} requests waiting, "
                    f"max_queue={self.config.max_queue}); retry later or scale the pool"
                )
            fut: asyncio.Future[ZygoteWorker] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self._fill()
            try:
                worker = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(fut.result())
                else:
                    # Leave the queue now: a cancelled waiter left there counted against
                    # max_queue, so abandoned requests could turn new ones away (QueueFull).
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        try:
            yield worker
        except asyncio.CancelledError:
            # Mid-conversation the worker's protocol state is unknown: kill it (and with it
            # the running program); a fresh one replaces it.
            worker.kill()
            raise
        finally:
            self._release(worker)

    # --- API ----------------------------------------------------------------------------------

    async def run(self, request: RunRequest | None = None, /, **fields: Any) -> RunResult:
        """Run one program: ``await pool.run(code="print(1)")`` or ``run(RunRequest(...))``."""
        req = request if request is not None else RunRequest(**fields)
        limits = req.limits.clamp(self.config.max_limits)
        with get_tracer().start_as_current_span(semconv.SPAN_SANDBOX_RUN) as span:
            span.set_attribute(semconv.SANDBOX_LANGUAGE, req.language)
            submitted = time.monotonic()
            result = await self._run_one(req, limits, submitted)
            _annotate(span, result.status, result.queue_wait_s, result.wall_s, result.cpu_s)
            pool_metrics.record(
                "run", req.language, result.status.value, result.queue_wait_s, result.wall_s
            )
            return result

    async def _run_one(self, req: RunRequest, limits: Limits, submitted: float) -> RunResult:
        async with self._worker() as worker:
            wait = time.monotonic() - submitted
            try:
                # One write for the whole conversation: no round trip between its steps. With
                # no files to fetch, the job ends the request: one frame fewer each way.
                last = not req.fetch_files
                frames = self._talk.compile_frames(req)
                frames += self._talk.job_frames(req, limits, stdin=req.stdin, last=last)
                if not last:
                    fetch = {
                        "op": "fetch",
                        "names": req.fetch_files,
                        "limit": self._talk.fetch_limit,
                    }
                    frames += wire.encode_json(fetch)
                await worker.send(frames)
                step = await self._talk.compile_step(worker, req)
                raw = await self._talk.read_job(worker, limits)
                files = {} if last else await self._talk.read_fetch(worker)
            except WorkerDied as exc:
                return RunResult(status=RunStatus.SANDBOX_ERROR, error=str(exc), queue_wait_s=wait)
            if step is not None and not step.compiled:
                return step.model_copy(update={"queue_wait_s": wait})
            result = to_result(raw, limits)
            fetched, problems, truncated = {}, [], []
            for name, item in files.items():
                if "content_b64" in item:
                    fetched[name] = item["content_b64"]
                    if item.get("truncated"):
                        truncated.append(name)
                else:
                    problems.append(f"{name}: {item.get('error')}")
            update: dict[str, Any] = {
                "files": fetched,
                "files_truncated": truncated,
                "queue_wait_s": wait,
            }
            if step is not None:
                update.update(compiled=True, compile_s=step.compile_s)
            if problems and result.error is None:
                update["error"] = "could not fetch " + "; ".join(problems)
            return result.model_copy(update=update)

    async def run_tests(
        self, request: RunTestsRequest | None = None, /, *, workers: int = 1, **fields: Any
    ) -> RunTestsResult:
        """Run a batch of test cases against one program, in one request (one compile, one
        private working directory, a fresh process per test).

        ``workers`` > 1 spreads the tests over that many workers at once, in contiguous shares
        (each compiles the program in its own sandbox): the elastic fan-out that the scheduler
        pays for when it starts a ``sandbox.run_tests`` action on several units. The result is
        the one a single worker would give, verdicts in test order."""
        req = request if request is not None else RunTestsRequest(**fields)
        if workers < 1:
            raise ValueError(f"run_tests(workers={workers}): need at least one worker")
        limits = req.limits.clamp(self.config.max_limits)
        shares = min(workers, len(req.tests), self.config.max_workers)
        with get_tracer().start_as_current_span(semconv.SPAN_SANDBOX_RUN_TESTS) as span:
            span.set_attribute(semconv.SANDBOX_LANGUAGE, req.language)
            span.set_attribute(semconv.SANDBOX_TESTS, len(req.tests))
            span.set_attribute(semconv.SANDBOX_WORKERS, shares)
            submitted = time.monotonic()
            if shares > 1:
                result = await self._run_tests_spread(req, limits, shares, submitted)
            else:
                result = await self._run_tests(req, limits, submitted)
            _annotate(span, result.status, result.queue_wait_s, result.wall_s, None)
            span.set_attribute(semconv.SANDBOX_PASS_FRACTION, result.pass_fraction)
            pool_metrics.record(
                "run_tests", req.language, result.status.value, result.queue_wait_s, result.wall_s
            )
            return result

    async def _run_tests_spread(
        self, req: RunTestsRequest, limits: Limits, shares: int, submitted: float
    ) -> RunTestsResult:
        """Run contiguous shares of the tests on ``shares`` workers at once and merge them."""
        total = len(req.tests)
        bounds = [total * i // shares for i in range(shares + 1)]
        tasks = [
            asyncio.ensure_future(
                self._run_tests(
                    req.model_copy(update={"tests": req.tests[lo:hi]}), limits, submitted
                )
            )
            for lo, hi in itertools.pairwise(bounds)
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            # One share failed (a full queue, a closed pool) or the caller cancelled: stop the
            # others too, so that no worker keeps running a share whose result is dropped.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return merge_shares(parts, bounds, stop_on_first_failure=req.stop_on_first_failure)

    async def _run_tests(
        self, req: RunTestsRequest, limits: Limits, submitted: float
    ) -> RunTestsResult:
        verdicts: list[TestVerdict] = []
        total = len(req.tests)
        async with self._worker() as worker:
            wait = time.monotonic() - submitted
            started = time.monotonic()
            try:
                if req.isolation == "batch":
                    compiled = await self._talk.batch_tests(worker, req, limits, verdicts)
                    if compiled is not None:
                        return not_compiled(compiled, total, wait)
                    return run_tests_result(
                        verdicts,
                        total,
                        wait,
                        time.monotonic() - started,
                        stop_on_first_failure=req.stop_on_first_failure,
                    )
                jobs = [self._talk.test_frames(req, limits, t) for t in req.tests]
                pipelined = not req.stop_on_first_failure
                end = wire.encode_json({"op": "fetch", "names": []})
                # Without early stop every test runs: send them all, then read the verdicts.
                head = self._talk.compile_frames(req)
                await worker.send(head + b"".join(jobs) + end if pipelined else head)
                compiled = await self._talk.compiled(worker, req)
                for index, test in enumerate(req.tests):
                    if not pipelined:
                        if compiled is not None:
                            break
                        await worker.send(jobs[index])
                    raw = await self._talk.read_job(worker, limits)
                    if compiled is not None:
                        continue  # skipped by the worker; read to keep the stream in step
                    verdict = judge(index, test, raw, limits, req.rel_tol)
                    verdicts.append(verdict)
                    if verdict.status is RunStatus.SANDBOX_ERROR:
                        raise WorkerDied(verdict.message or "sandbox error")
                    if not pipelined and not verdict.passed:
                        break
                if not pipelined:
                    await worker.send(end)
                await self._talk.read_fetch(worker)
                if compiled is not None:
                    return not_compiled(compiled, total, wait)
            except WorkerDied as exc:
                return RunTestsResult(
                    status=RunStatus.SANDBOX_ERROR,
                    passed=sum(v.passed for v in verdicts),
                    total=total,
                    pass_fraction=0.0,
                    verdicts=verdicts,
                    error=str(exc),
                    queue_wait_s=wait,
                    wall_s=time.monotonic() - started,
                )
        return run_tests_result(verdicts, total, wait, time.monotonic() - started)


def _annotate(
    span: Any, status: RunStatus, queue_wait_s: float, wall_s: float, cpu_s: float | None
) -> None:
    span.set_attribute(semconv.SANDBOX_STATUS, status.value)
    span.set_attribute(semconv.SANDBOX_QUEUE_WAIT_S, queue_wait_s)
    span.set_attribute(semconv.SANDBOX_WALL_S, wall_s)
    if cpu_s is not None:
        span.set_attribute(semconv.SANDBOX_CPU_S, cpu_s)
    if status is RunStatus.SANDBOX_ERROR:
        span.set_attribute(semconv.ERROR_TYPE, status.value)
        span.set_status(Status(StatusCode.ERROR, status.value))
