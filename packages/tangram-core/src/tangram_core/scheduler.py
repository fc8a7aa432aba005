"""The scheduler interface: pure decisions over a queue and a pool, no clock and no I/O.

Why pure: the same scheduler object is driven by the asyncio runtime (wall clock, real
workers), the Ray runtime, and the discrete-event simulator (virtual clock, a million actions).
Every call takes ``now``; nothing inside reads a clock, sleeps, or touches a process. So a
decision can be replayed, unit-tested in microseconds and simulated at cluster scale.

The driver's loop:

1. ``submit(spec, now)`` when an action arrives;
2. ``schedule(now)`` returns a :class:`Plan`: which queued actions start now, on how many units,
   and which running elastic actions grow or shrink;
3. the driver carries out the plan (start on a manager, resize), then ``complete(id, now)`` when
   an action ends, which frees its units and teaches the duration estimator.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from tangram_core.actions import Action


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """The scheduler's compact, immutable view of an action.

    ``factors[i]`` is T(min_units + i) / T(1); ``demand`` is per unit, as a sorted tuple so that
    actions of one shape share a queue.
    """

    id: str
    kind: str
    demand: tuple[tuple[str, float], ...]
    min_units: int = 1
    max_units: int = 1
    factors: tuple[float, ...] = (1.0,)
    size: float = 1.0
    priority: int = 0
    estimated_t1: float | None = None
    trajectory_id: str | None = None
    # Numbers the payload carries that predict its duration (tests, code bytes, tokens), sorted
    # by name; the payload-aware estimator learns from them.
    features: tuple[tuple[str, float], ...] = ()

    def factor(self, units: int) -> float:
        return self.factors[min(max(units, self.min_units), self.max_units) - self.min_units]

    @property
    def elastic(self) -> bool:
        return self.max_units > self.min_units

    @classmethod
    def from_action(cls, action: Action) -> ActionSpec:
        e = action.elasticity
        return cls(
            id=action.id,
            kind=action.kind,
            demand=tuple(sorted(action.demand.items())),
            min_units=e.min_units,
            max_units=e.max_units,
            factors=tuple(e.factor(u) for u in range(e.min_units, e.max_units + 1)),
            size=action.size,
            priority=action.priority,
            estimated_t1=action.estimated_duration_s,
            trajectory_id=action.trajectory_id,
            features=tuple(sorted(action.features.items())),
        )


class Start(NamedTuple):
    """Start a queued action on ``units`` units.

    A named tuple, not a frozen dataclass: a busy simulation builds a million of these, and a
    frozen dataclass's ``__init__`` costs several times a tuple's."""

    action_id: str
    units: int


class Resize(NamedTuple):
    """Change a running elastic action's units (up: spare capacity; down: reclaim for the queue)."""

    action_id: str
    units: int


@dataclass(frozen=True, slots=True)
class Plan:
    starts: tuple[Start, ...] = ()
    resizes: tuple[Resize, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.starts or self.resizes)


EMPTY_PLAN = Plan()


@dataclass(slots=True)
class SchedulerStats:
    """Counters a driver exports as metrics."""

    submitted: int = 0
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    resizes: int = 0
    resizes_refused: int = 0
    schedule_calls: int = 0
    by_kind_started: dict[str, int] = field(default_factory=dict)


class CapacityError(ValueError):
    """An action's minimum demand exceeds the whole pool: it could never start."""


class Scheduler(abc.ABC):
    """Decides what starts now, and on how many units; implementations are pure, deterministic."""

    #: Whether :meth:`trajectory_done` frees resources (trajectory-bound leases). An open-loop
    #: driver then tracks when each trajectory's last action ends; others skip that cost.
    holds_trajectories: bool = False

    @abc.abstractmethod
    def set_capacity(
        self, capacity: Mapping[str, float], limits: Mapping[str, float] | None = None
    ) -> None:
        """Called by the driver whenever a pool grows or shrinks (autoscaling, a lost node).

        ``limits`` is what the pools could scale to; an action bigger than that is refused at
        submission. It defaults to ``capacity``."""

    @abc.abstractmethod
    def submit(self, spec: ActionSpec, now: float) -> None:
        """Called once per action when it arrives. Raises :class:`CapacityError` if it can
        never fit, so the caller fails fast instead of queueing forever."""

    @abc.abstractmethod
    def schedule(self, now: float) -> Plan:
        """Called after any submit, completion or capacity change; cheap when nothing changed."""

    @abc.abstractmethod
    def complete(self, action_id: str, now: float, *, succeeded: bool = True) -> None:
        """Called when a started action ends (any status): frees its units. Successful runs
        also teach the duration estimator."""

    @abc.abstractmethod
    def cancel(self, action_id: str) -> bool:
        """Remove a still-queued action; False if it is unknown or already running."""

    @abc.abstractmethod
    def requeue(self, action_id: str, now: float) -> None:
        """Put a started action back in the queue (its worker died): frees its units, keeps its
        original submission time so it does not lose its place to aging."""

    def resize_refused(self, action_id: str, units: int, now: float) -> None:  # noqa: B027
        """The manager kept running action ``action_id`` on ``units`` units: it refused (or
        failed) a resize of the plan. Schedulers that resize running actions put their
        accounting back to ``units`` and stop resizing that action; others ignore it."""

    def trajectory_done(self, trajectory_id: str, now: float) -> None:  # noqa: B027
        """Called when a trajectory ends. Action-level schedulers hold nothing per trajectory and
        ignore it; trajectory-bound provisioning (the static baseline) frees the trajectory's
        sandbox here."""

    def queued_demand(self) -> dict[str, float]:
        """Minimum units the queued actions need, per resource type (autoscaling input)."""
        return {}

    def queued_work_s(self) -> dict[str, float]:
        """Estimated single-unit seconds of work waiting, per resource type (autoscaling input)."""
        return {}

    @property
    @abc.abstractmethod
    def queued(self) -> int: ...

    @property
    @abc.abstractmethod
    def running(self) -> int: ...

    @abc.abstractmethod
    def usage(self) -> dict[str, float]:
        """Units in use per resource type."""

    @abc.abstractmethod
    def capacity(self) -> dict[str, float]: ...
