"""The resource-manager protocol: what the orchestrator needs from a pool that runs actions.

Why an ABC this small: the scheduler decides *what* runs and on how many units; a manager only
*runs* it (a local process pool, a sandbox pool, a Ray Serve deployment) and says how much it
has. Keeping the lifecycle to a handful of calls (the shape of verl's worker ABCs and of
OpenTelemetry's ``SpanExporter``) lets one orchestrator drive every backend, and lets a backend
be tested on its own.

Failure contract, which the orchestrator's retry policy rests on:

* :class:`WorkerLost`: the worker executing the action died (killed, out of memory, node gone).
  Infrastructure failed, not the action, so the orchestrator retries it within its budget.
* :class:`ActionError`, or any other exception: the action's own failure (bad code, bad input).
  Retrying would fail the same way, so it is reported, not retried.
* ``asyncio.CancelledError``: the action was cancelled (through :meth:`ResourceManager.cancel`,
  or by cancelling the task awaiting :meth:`ResourceManager.start`).
"""

from __future__ import annotations

import abc
import fnmatch
from collections.abc import Callable
from typing import Any

from tangram_core.actions import Action

__all__ = ["ActionError", "ResourceManager", "WorkerLost"]


class WorkerLost(Exception):
    """The worker running an action died before the action finished; retrying may succeed.

    ``exitcode`` follows :attr:`multiprocessing.Process.exitcode` (negative: killed by that
    signal) when the manager knows it.
    """

    def __init__(
        self,
        message: str,
        *,
        action_id: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.action_id = action_id
        self.pid = pid
        self.exitcode = exitcode


class ActionError(Exception):
    """An action failed somewhere its own exception object cannot come back from.

    A worker process or a remote service reports the failure by class name and message; the
    orchestrator reports ``error_type`` (not ``"ActionError"``) as ``ActionResult.error_type``
    and the span's ``error.type``, so dashboards group by the real cause.
    """

    def __init__(self, error_type: str, message: str, *, traceback: str | None = None) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class ResourceManager(abc.ABC):
    """One pool of resources that executes actions of some kinds; driven by the orchestrator.

    Calls come from one asyncio event loop. The orchestrator calls, in order: :meth:`open`
    once, then :meth:`start` for each action the scheduler places (concurrently),
    :meth:`resize` / :meth:`cancel` while actions run, :meth:`scale_to` when autoscaling
    decides, and :meth:`shutdown` once at the end. :meth:`resources`, :meth:`limits` and
    :meth:`health` are cheap synchronous queries it may call at any time.

    Subclasses set ``name`` (unique among the orchestrator's managers) and ``kinds``.
    """

    name: str
    #: Action kinds this manager executes, as ``fnmatch`` patterns (``"sandbox.*"``).
    kinds: frozenset[str] = frozenset()
    #: Seconds a new unit takes to become usable; the autoscaler weighs it against queueing.
    warmup_s: float = 0.0
    #: Relative price of holding one unit for one second, for cost reports and autoscaling.
    unit_cost: float = 0.0
    #: Whether :meth:`resize` can change a running action's units. When every manager says no,
    #: the orchestrator's default scheduler chooses units at start only.
    supports_resize: bool = False
    #: Set by the orchestrator that drives this manager. A manager whose capacity changes on
    #: its own (a replica comes back, a worker dies) calls :meth:`capacity_changed`, so queued
    #: work starts at once instead of at the next submission or completion.
    on_capacity_change: Callable[[], None] | None = None

    def capacity_changed(self) -> None:
        """Tell the driving orchestrator that :meth:`resources` now answers differently."""
        if self.on_capacity_change is not None:
            self.on_capacity_change()

    def handles(self, kind: str) -> bool:
        """Whether this manager executes actions of ``kind``; matches :attr:`kinds` by default."""
        return any(fnmatch.fnmatchcase(kind, pattern) for pattern in self.kinds)

    @abc.abstractmethod
    def resources(self) -> dict[str, float]:
        """Resource types and amounts this manager provides now, e.g. ``{"cpu": 4.0}``.

        The orchestrator passes them to the scheduler as capacity, so they must be in the same
        units as actions' ``demand`` (one worker per unit of demand, for a process pool). It
        asks on every submission and completion, from the event loop: answer from memory, never
        with a blocking call to a remote controller."""

    def limits(self) -> dict[str, float]:
        """The most of each resource type this manager can scale to; defaults to what it has."""
        return self.resources()

    async def open(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called once before the first :meth:`start`, in the event loop that will drive the
        manager: acquire workers here so that the first action does not pay the warm-up."""

    @abc.abstractmethod
    async def start(self, action: Action, units: int) -> Any:
        """Run ``action`` on ``units`` units to completion and return its output.

        Raise :class:`WorkerLost` when the worker died under it, any other exception when the
        action itself failed. If the task awaiting this call is cancelled, stop the action
        and free its units before re-raising ``CancelledError``."""

    async def resize(self, action_id: str, units: int) -> bool:
        """Give a running action ``units`` units; False when unsupported or not running."""
        return False

    @abc.abstractmethod
    async def cancel(self, action_id: str) -> bool:
        """Stop a waiting or running action; its :meth:`start` then raises ``CancelledError``.
        False when this manager does not know the action (it already ended)."""

    @abc.abstractmethod
    async def scale_to(self, n_units: int) -> None:
        """Grow or shrink to ``n_units`` units. Shrinking never interrupts a running action:
        busy units leave when their action ends. Raise ``ValueError`` beyond :meth:`limits`."""

    def health(self) -> bool:
        """Whether the manager can run actions now (all its units are up)."""
        return True

    @abc.abstractmethod
    async def shutdown(self, drain: bool = True) -> None:
        """Release every unit. ``drain=True`` lets started actions finish first; ``False``
        cancels them. Further :meth:`start` calls fail."""
