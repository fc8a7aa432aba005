"""A pool of local worker processes that runs Python functions: the first real ResourceManager.

An action's payload names a function by import path and gives its arguments::

    Action(kind="process.call", payload={"fn": "module:function", "args": [...], "kwargs": {...}})

One worker process provides one unit of ``cpu`` (configurable). An action started on ``u`` units
holds ``u`` workers' worth of the pool and runs in one of them; a function that declares a
``units`` parameter receives ``u``, so that it can size its own parallelism. Rigid actions
(the default, ``u = 1``) never notice.

Why hand-rolled rather than ``concurrent.futures.ProcessPoolExecutor``: the executor marks the
whole pool broken when one worker dies, failing every queued and running call. Here each worker
has its own pipe, so a death is seen per worker: the one action it ran fails with
:class:`~tangram_core.resource_manager.WorkerLost` (retryable), a replacement starts, and
nothing else notices.

How it runs: the event loop watches each worker's pipe (replies) and its process sentinel
(exit) with ``loop.add_reader``, so there are no helper threads and all state is touched from
one thread. Workers are forked from multiprocessing's fork server by default, preloaded with
this module: a new worker costs milliseconds, not an interpreter start-up (the first pool in a
process starts the fork server, about a second, once; the server lives until the interpreter
exits).

As with any ``spawn``/``forkserver`` multiprocessing, each worker re-imports the main module,
so a script that uses the pool must guard its entry point with ``if __name__ == "__main__":``.
Workers that die while starting (that mistake, a broken environment) would otherwise be
replaced forever: after ``_MAX_STARTUP_FAILURES`` such deaths in a row the pool stops replacing
them and every start fails with :class:`WorkerLost` whose message names the likely cause.

This pool is not a sandbox: a worker runs whatever function its payload names (within
``allowed_functions``) with this process's rights. Untrusted code belongs in ``tangram_sandbox``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import signal
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tangram_core.actions import Action, InvalidPayload
from tangram_core.function_call import (
    FunctionCall,
    function_action,
    parse_function_call,
    resolve_function,
)
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost

__all__ = [
    "FunctionCall",
    "InvalidPayload",
    "ProcessPoolConfig",
    "ProcessPoolManager",
    "cpu_task",
    "function_action",
    "sleep_task",
]

logger = logging.getLogger(__name__)

_MAX_STARTUP_FAILURES = 3  # workers in a row that die before they are ready: stop replacing


# --- built-in functions for tests and benchmarks ------------------------------------------------


def sleep_task(seconds: float, units: int = 1, parallel_fraction: float = 0.0) -> float:
    """Sleep ``T(units) = seconds * ((1 - p) + p / units)`` and return it.

    A stand-in action whose run time is known exactly: rigid by default (``p = 0``), elastic
    under Amdahl's law with ``parallel_fraction > 0``, so that benchmarks can check the elastic
    scheduler against real processes."""
    duration = seconds * ((1.0 - parallel_fraction) + parallel_fraction / max(units, 1))
    time.sleep(duration)
    return duration


def cpu_task(iterations: int) -> int:
    """Real CPU work: ``iterations`` rounds of an integer hash. Returns the hash, so that the
    work cannot be skipped and a test can check the answer came from this function."""
    x = 0
    for i in range(iterations):
        x = (x * 1_000_003 + i) & 0xFFFFFFFF
    return x


# --- configuration and payload -------------------------------------------------------------------


class ProcessPoolConfig(BaseModel):
    """Static settings of a :class:`ProcessPoolManager`; its size is runtime state instead."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("process", min_length=1, description="Manager name, unique per orchestrator.")
    kinds: tuple[str, ...] = Field(
        ("process.*",), min_length=1, description="fnmatch patterns of the action kinds it runs."
    )
    resource: str = Field(
        "cpu", min_length=1, description="The resource type of which one worker is one unit."
    )
    start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver",
        description="How workers start: 'forkserver' forks them from a preloaded server "
        "(milliseconds each; sets multiprocessing's fork-server preload list), 'spawn' starts "
        "a fresh interpreter for each (slower, shares nothing).",
    )
    allowed_functions: tuple[str, ...] = Field(
        ("*",),
        min_length=1,
        description="fnmatch patterns over 'module:function' that payloads may name; anything "
        "else is refused before it reaches a worker.",
    )
    warmup_s: float = Field(0.05, ge=0, description="Seconds a new worker takes to be usable.")
    unit_cost: float = Field(1.0, ge=0, description="Relative price of one worker-second.")
    stop_timeout_s: float = Field(
        5.0, gt=0, description="How long shutdown waits for a worker to exit before killing it."
    )


# --- the worker process --------------------------------------------------------------------------


def _worker_main(conn: Connection) -> None:
    """A worker's loop: run one call at a time and reply on the pipe; exit on ``None`` or when
    the parent's end of the pipe closes (the parent died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    functions: dict[str, tuple[Callable[..., Any], bool]] = {}
    try:
        conn.send(("ready", None))
    except OSError:
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        action_id, fn_path, args, kwargs, units = msg
        try:
            fn, wants_units = resolve_function(fn_path, functions)
            if wants_units:
                kwargs = {**kwargs, "units": units}
            reply: tuple[Any, ...] = ("ok", action_id, fn(*args, **kwargs))
        except (Exception, SystemExit) as exc:
            reply = _error_reply(action_id, exc)
        try:
            conn.send(reply)
        except OSError:
            return  # the parent is gone
        except Exception as exc:  # the output does not pickle; nothing was written yet
            error = TypeError(f"the output of {fn_path} cannot be sent back to the pool: {exc}")
            conn.send(_error_reply(action_id, error))


def _error_reply(action_id: str, exc: BaseException) -> tuple[Any, ...]:
    """The failure as (type name, message, traceback text, the exception pickled if it can
    make the round trip)."""
    tb = "".join(traceback.format_exception(exc))
    blob: bytes | None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt (required arguments)
    except Exception:
        blob = None
    return ("error", action_id, type(exc).__name__, str(exc), tb, blob)


class _RemoteTraceback(Exception):
    """Carries a worker's traceback text as the ``__cause__`` of the re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n--- in the worker process ---\n{self.tb}"


def _rebuild_error(type_name: str, message: str, tb: str, blob: bytes | None) -> Exception:
    """The worker's exception as itself when it survives pickling, else as an ActionError."""
    exc: Any = None
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(blob)
    if isinstance(exc, Exception) and not isinstance(exc, WorkerLost):
        exc.__cause__ = _RemoteTraceback(tb)
        return exc
    return ActionError(type_name, message, traceback=tb)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "its exit status is unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _kill_all(processes: dict[int, BaseProcess]) -> None:
    """Finalizer: a pool dropped without ``shutdown()`` must not leave workers behind."""
    for process in list(processes.values()):
        with contextlib.suppress(Exception):
            process.kill()
            process.join(1.0)
    processes.clear()


# --- the manager ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Task:
    """One start() call: waiting for workers, then running on ``worker``."""

    action_id: str
    kind: str
    call: FunctionCall
    units: int
    future: asyncio.Future[Any]
    worker: _Worker | None = None


@dataclass(eq=False, slots=True)
class _Worker:
    """Mutable runtime state of one worker process; only the event-loop thread touches it."""

    wid: int
    process: BaseProcess
    conn: Connection
    pid: int
    task: _Task | None = None
    ready: bool = False  # it started up and reported in
    retiring: bool = False  # leaves once idle (scale-down, shutdown)
    stop_sent: bool = False
    dead: bool = False  # killed by us or its pipe broke: give it no more work


class ProcessPoolManager(ResourceManager):
    """Runs ``module:function`` payloads in a pool of local worker processes.

    Capacity is ``{config.resource: workers}``; :meth:`scale_to` changes it between 0 and
    ``max_workers``. A worker that dies is replaced at once; the action it ran fails with
    :class:`WorkerLost`. Cancelling an action kills its worker (the only way to stop arbitrary
    Python code) and starts a fresh one. Resizing a running action is not supported.

    Bound to one event loop: the one in which it is first used.
    """

    supports_resize = False

    def __init__(
        self,
        workers: int = 1,
        *,
        max_workers: int | None = None,
        config: ProcessPoolConfig | None = None,
    ) -> None:
        self.config = config or ProcessPoolConfig()
        max_workers = max(workers, 1) if max_workers is None else max_workers
        if workers < 0 or max_workers < 1 or workers > max_workers:
            raise ValueError(
                f"process pool {self.config.name!r}: need 0 <= workers ({workers}) <= "
                f"max_workers ({max_workers}) and max_workers >= 1; raise max_workers"
            )
        self.name = self.config.name
        self.kinds = frozenset(self.config.kinds)
        self.warmup_s = self.config.warmup_s
        self.unit_cost = self.config.unit_cost
        self._ctx = multiprocessing.get_context(self.config.start_method)
        self._size = workers  # the target; live workers converge to it
        self._max = max_workers
        self._workers: dict[int, _Worker] = {}
        self._tasks: dict[str, _Task] = {}
        self._waiting: collections.deque[_Task] = collections.deque()
        self._in_use = 0  # units held by tasks on workers
        self._wids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._startup_failures = 0
        self._broken: str | None = None  # why workers cannot start; then none are replaced
        self._all_exited: asyncio.Event | None = None
        self._processes: dict[int, BaseProcess] = {}
        self._finalizer = weakref.finalize(self, _kill_all, self._processes)

    # -- queries ---------------------------------------------------------------------------------

    def resources(self) -> dict[str, float]:
        return {self.config.resource: float(self._size)}

    def limits(self) -> dict[str, float]:
        return {self.config.resource: float(self._max)}

    def health(self) -> bool:
        if self._closing or self._broken:
            return False
        if self._loop is None:
            return True  # workers start on first use
        up = sum(
            1 for w in self._workers.values() if not (w.retiring or w.dead) and w.process.is_alive()
        )
        return up >= self._size

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (including ones about to leave)."""
        return [w.pid for w in self._workers.values()]

    def running(self) -> dict[str, int]:
        """Running actions, by id, with the PID of the worker running each."""
        return {w.task.action_id: w.pid for w in self._workers.values() if w.task and not w.dead}

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError(
                f"process pool {self.name!r} is bound to the event loop it was first used in; "
                f"create one ProcessPoolManager per event loop"
            )
        if self._closing:
            raise RuntimeError(f"process pool {self.name!r} is shut down; create a new one")
        self._loop = loop
        self._all_exited = asyncio.Event()
        self._all_exited.set()
        if self.config.start_method == "forkserver":
            self._ctx.set_forkserver_preload([__name__])
        self._reconcile()

    async def start(self, action: Action, units: int) -> Any:
        call = self._parse(action)
        if not 1 <= units <= self._max:
            raise ValueError(
                f"action {action.id!r} ({action.kind}) asks for {units} unit(s); process pool "
                f"{self.name!r} can give 1..{self._max} (max_workers)"
            )
        await self.open()
        if self._closing:
            raise RuntimeError(
                f"process pool {self.name!r} is shut down; it cannot start action {action.id!r}"
            )
        if self._broken:
            raise WorkerLost(self._broken, action_id=action.id)
        if action.id in self._tasks:
            raise ValueError(
                f"action {action.id!r} is already running in process pool {self.name!r}; "
                f"every action needs a unique id"
            )
        assert self._loop is not None
        task = _Task(action.id, action.kind, call, units, self._loop.create_future())
        self._tasks[action.id] = task
        self._waiting.append(task)
        self._dispatch()
        try:
            return await task.future
        except asyncio.CancelledError:
            self._abort(task)
            raise
        finally:
            if self._tasks.get(action.id) is task:
                del self._tasks[action.id]

    async def cancel(self, action_id: str) -> bool:
        task = self._tasks.get(action_id)
        if task is None:
            return False
        self._abort(task)
        return True

    async def scale_to(self, n_units: int) -> None:
        if not 0 <= n_units <= self._max:
            raise ValueError(
                f"scale_to({n_units}): process pool {self.name!r} holds 0..{self._max} workers "
                f"(max_workers); raise max_workers to grow further"
            )
        if self._closing:
            raise RuntimeError(f"process pool {self.name!r} is shut down; it cannot scale")
        self._size = n_units
        await self.open()
        self._reconcile()
        self._dispatch()

    async def shutdown(self, drain: bool = True) -> None:
        """Stop every worker. ``drain=True`` waits for started actions (however long they
        take: bound them with the orchestrator's ``action_timeout_s``); ``drain=False`` kills
        their workers and their :meth:`start` raises ``CancelledError``."""
        self._closing = True
        if self._loop is None:
            return
        if drain:
            pending = [t.future for t in self._tasks.values()]
            if pending:
                await asyncio.wait(pending)
        else:
            for task in list(self._tasks.values()):
                self._abort(task)
        self._size = 0
        self._reconcile()
        if not await self._wait_exited(self.config.stop_timeout_s):
            logger.warning(
                "process pool %r: %d worker(s) did not stop within %.1fs; killing them",
                self.name,
                len(self._workers),
                self.config.stop_timeout_s,
            )
            for worker in list(self._workers.values()):
                self._kill(worker)
            await self._wait_exited(None)

    # -- internals -------------------------------------------------------------------------------

    def _parse(self, action: Action) -> FunctionCall:
        return parse_function_call(action, self.name, self.config.allowed_functions)

    def _spawn(self) -> None:
        assert self._loop is not None
        assert self._all_exited is not None
        wid = next(self._wids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child_conn,),
            name=f"tangram-{self.name}-{wid}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so that the parent's end sees EOF when the worker dies
        assert process.pid is not None
        worker = _Worker(wid, process, parent_conn, process.pid)
        self._workers[wid] = worker
        self._processes[wid] = process
        self._all_exited.clear()
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        self._loop.add_reader(process.sentinel, self._on_exit, worker)

    def _reconcile(self) -> None:
        """Bring the workers that stay to the target size: spawn, or retire idle ones first."""
        if self._loop is None or self._broken:
            return
        staying = [w for w in self._workers.values() if not w.retiring]
        need = self._size - len(staying)
        if need > 0:
            for worker in self._workers.values():  # take back leavers not yet told to stop
                if need and worker.retiring and not worker.stop_sent and not worker.dead:
                    worker.retiring = False
                    need -= 1
            for _ in range(need):
                self._spawn()
        elif need < 0:
            for worker in sorted(staying, key=lambda w: w.task is not None)[:-need]:
                worker.retiring = True
                if worker.task is None:
                    self._send_stop(worker)

    def _send_stop(self, worker: _Worker) -> None:
        worker.stop_sent = True
        with contextlib.suppress(OSError):
            worker.conn.send(None)

    def _kill(self, worker: _Worker) -> None:
        worker.dead = True
        with contextlib.suppress(OSError, ValueError):
            worker.process.kill()

    def _dispatch(self) -> None:
        """Start waiting tasks in arrival order while units and an idle worker are free."""
        while self._waiting:
            task = self._waiting[0]
            if self._in_use + task.units > self._size:
                return
            worker = next(
                (
                    w
                    for w in self._workers.values()
                    if w.task is None and not (w.retiring or w.dead)
                ),
                None,
            )
            if worker is None:
                return
            self._waiting.popleft()
            call = task.call
            try:
                worker.conn.send((task.action_id, call.fn, call.args, call.kwargs, task.units))
            except OSError:  # the worker is dying: its exit handler replaces it
                worker.dead = True
                self._waiting.appendleft(task)
                continue
            except Exception as exc:  # the arguments do not pickle; nothing was written
                if not task.future.done():
                    task.future.set_exception(
                        InvalidPayload(
                            f"action {task.action_id!r}: its arguments cannot be sent to a "
                            f"worker process (they must pickle): {exc}"
                        )
                    )
                continue
            worker.task = task
            task.worker = worker
            self._in_use += task.units

    def _abort(self, task: _Task) -> None:
        """Stop ``task`` wherever it is; a running one loses its worker (which is replaced)."""
        if task in self._waiting:
            self._waiting.remove(task)
        worker = task.worker
        if worker is not None and not worker.dead:
            self._kill(worker)
        if not task.future.done():
            task.future.cancel()

    def _on_readable(self, worker: _Worker) -> None:
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(worker.conn.fileno())
            return  # it exited: _on_exit follows from its sentinel
        self._on_message(worker, msg)
        self._dispatch()

    def _on_message(self, worker: _Worker, msg: tuple[Any, ...]) -> None:
        status, action_id = msg[0], msg[1]
        if status == "ready":
            worker.ready = True
            self._startup_failures = 0
            return
        task = worker.task
        if task is None or task.action_id != action_id:
            logger.warning("process pool %r: stray reply for %r ignored", self.name, action_id)
            return
        worker.task = None
        task.worker = None
        self._in_use -= task.units
        if not task.future.done():
            if status == "ok":
                task.future.set_result(msg[2])
            else:
                task.future.set_exception(_rebuild_error(*msg[2:]))
        if worker.retiring and not worker.stop_sent:
            self._send_stop(worker)

    def _on_exit(self, worker: _Worker) -> None:
        assert self._loop is not None
        assert self._all_exited is not None
        self._loop.remove_reader(worker.process.sentinel)
        self._loop.remove_reader(worker.conn.fileno())
        dead_already = worker.dead
        worker.dead = True
        with contextlib.suppress(EOFError, OSError):
            while worker.conn.poll():  # a reply sent just before it exited still counts
                self._on_message(worker, worker.conn.recv())
        worker.process.join(1.0)
        exitcode = worker.process.exitcode
        del self._workers[worker.wid]
        del self._processes[worker.wid]
        worker.conn.close()
        with contextlib.suppress(ValueError):
            worker.process.close()
        task = worker.task
        if task is not None:
            worker.task = None
            task.worker = None
            self._in_use -= task.units
            if not task.future.done():
                task.future.set_exception(
                    WorkerLost(
                        f"worker {worker.wid} (pid {worker.pid}) of process pool {self.name!r} "
                        f"died while running action {task.action_id!r} ({task.kind}): "
                        f"{_describe_exit(exitcode)}. The action did not finish; retrying it "
                        f"is safe if it is idempotent",
                        action_id=task.action_id,
                        pid=worker.pid,
                        exitcode=exitcode,
                    )
                )
        elif not (worker.retiring or dead_already):
            logger.warning(
                "process pool %r: idle worker (pid %d) %s; replacing it",
                self.name,
                worker.pid,
                _describe_exit(exitcode),
            )
        if not (worker.ready or worker.retiring or dead_already):
            self._startup_failures += 1
            if self._startup_failures >= _MAX_STARTUP_FAILURES and not self._broken:
                self._break(exitcode)
        if not self._workers:
            self._all_exited.set()
        self._reconcile()
        self._dispatch()

    def _break(self, exitcode: int | None) -> None:
        """Workers keep dying as they start: stop replacing them and fail what waits."""
        self._broken = (
            f"process pool {self.name!r}: {self._startup_failures} workers in a row died while "
            f"starting ({_describe_exit(exitcode)}), so the pool stopped replacing them. See "
            f"their stderr. The usual cause: the main module is re-imported in each worker "
            f"({self.config.start_method!r} start method) and starts work itself; guard its "
            f"entry point with `if __name__ == '__main__':`. Create a new pool once fixed"
        )
        logger.error(self._broken)
        while self._waiting:
            task = self._waiting.popleft()
            if not task.future.done():
                task.future.set_exception(WorkerLost(self._broken, action_id=task.action_id))

    async def _wait_exited(self, timeout: float | None) -> bool:
        assert self._all_exited is not None
        try:
            await asyncio.wait_for(self._all_exited.wait(), timeout)
        except TimeoutError:
            return False
        return True
