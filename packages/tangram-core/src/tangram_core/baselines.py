"""The provisioning schemes Tangram is measured against, as schedulers.

Both baselines are FIFO over fixed partitions of the resources, which is what static
provisioning amounts to:

* **static** (:class:`StaticLeaseScheduler`): a trajectory leases a fixed-size sandbox at its
  first action and holds it for its whole life, LLM generation included; trajectories wait for a
  free sandbox; each reward model owns a fixed fleet. A trajectory's code runs only on its own
  sandbox, even while others sit idle.
* **isolated** (:func:`isolated_per_kind`): one fixed-size pool per action kind, shared by all
  trajectories but never lent to another kind.

Because they implement the same :class:`~tangram_core.scheduler.Scheduler` interface, the
simulator and the runtime drive them exactly like the elastic scheduler: a comparison changes
one argument. Inside a partition, an elastic action gets as many units as fit (up to its
maximum), so a baseline sandbox with 4 cores does use all 4 for a batch of tests.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

from tangram_core.scheduler import (
    EMPTY_PLAN,
    ActionSpec,
    CapacityError,
    Plan,
    Scheduler,
    SchedulerStats,
    Start,
)

_EPS = 1e-9
PartitionOf = Callable[[ActionSpec], str]


def _sum_partitions(parts: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for amounts in parts.values():
        for r, v in amounts.items():
            total[r] = total.get(r, 0.0) + v
    return total


class PartitionedFifoScheduler(Scheduler):
    """FIFO per partition; each partition has its own fixed resources that nobody else uses."""

    def __init__(
        self, partitions: Mapping[str, Mapping[str, float]], partition_of: PartitionOf
    ) -> None:
        self._partition_of = partition_of
        self._caps = {p: dict(c) for p, c in partitions.items()}
        self._used = {p: dict.fromkeys(c, 0.0) for p, c in partitions.items()}
        self._queues: dict[str, collections.deque[ActionSpec]] = {
            p: collections.deque() for p in partitions
        }
        self._running: dict[str, tuple[str, ActionSpec, int, float]] = {}
        self._dirty: set[str] = set()
        self._cancelled: set[str] = set()
        self._queued_n = 0
        self.stats = SchedulerStats()

    def set_capacity(
        self, capacity: Mapping[str, float], limits: Mapping[str, float] | None = None
    ) -> None:
        """Accepts only the capacity it already has: static partitions cannot be resized."""
        mine = self.capacity()
        if any(abs(capacity.get(r, 0.0) - v) > _EPS for r, v in mine.items()):
            raise TypeError(
                f"static baselines have fixed partitions (total {mine}); the pools report "
                f"{dict(capacity)}: size the pools to match, or build a new baseline"
            )

    def capacity(self) -> dict[str, float]:
        return _sum_partitions(self._caps)

    def usage(self) -> dict[str, float]:
        return _sum_partitions(self._used)

    @property
    def queued(self) -> int:
        return self._queued_n

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, spec: ActionSpec, now: float) -> None:
        part = self._partition_of(spec)
        cap = self._caps.get(part)
        if cap is None:
            raise CapacityError(
                f"action {spec.id!r} ({spec.kind}) maps to partition {part!r}, "
                f"which does not exist; partitions: {sorted(self._caps)[:5]}..."
            )
        for r, d in spec.demand:
            if d * spec.min_units > cap.get(r, 0.0) + _EPS:
                raise CapacityError(
                    f"action {spec.id!r} ({spec.kind}) needs {d * spec.min_units:g} {r}; its "
                    f"partition {part!r} holds {cap.get(r, 0.0):g}"
                )
        self._queues[part].append(spec)
        self._queued_n += 1
        self._dirty.add(part)
        self.stats.submitted += 1

    def _units_that_fit(self, part: str, spec: ActionSpec) -> int:
        cap, used = self._caps[part], self._used[part]
        units = spec.max_units
        for r, d in spec.demand:
            units = min(units, int((cap.get(r, 0.0) - used.get(r, 0.0) + _EPS) // d))
        return units

    def schedule(self, now: float) -> Plan:
        self.stats.schedule_calls += 1
        if not self._dirty:
            return EMPTY_PLAN
        starts: list[Start] = []
        for part in self._dirty:
            queue = self._queues[part]
            while queue:
                spec = queue[0]
                if spec.id in self._cancelled:
                    queue.popleft()
                    self._cancelled.discard(spec.id)
                    continue
                units = self._units_that_fit(part, spec)
                if units < spec.min_units:
                    break  # strict FIFO: no backfilling
                queue.popleft()
                self._queued_n -= 1
                for r, d in spec.demand:
                    self._used[part][r] = self._used[part].get(r, 0.0) + d * units
                self._running[spec.id] = (part, spec, units, now)
                starts.append(Start(spec.id, units))
        self._dirty.clear()
        self.stats.started += len(starts)
        return Plan(starts=tuple(starts)) if starts else EMPTY_PLAN

    def complete(self, action_id: str, now: float, *, succeeded: bool = True) -> None:
        part, spec, units, _ = self._running.pop(action_id)
        for r, d in spec.demand:
            self._used[part][r] = max(self._used[part][r] - d * units, 0.0)
        self._dirty.add(part)
        self.stats.completed += 1

    def cancel(self, action_id: str) -> bool:
        for part, queue in self._queues.items():
            if any(s.id == action_id for s in queue):
                self._cancelled.add(action_id)
                self._queued_n -= 1
                self._dirty.add(part)
                self.stats.cancelled += 1
                return True
        return False

    def requeue(self, action_id: str, now: float) -> None:
        part, spec, units, _ = self._running.pop(action_id)
        for r, d in spec.demand:
            self._used[part][r] = max(self._used[part][r] - d * units, 0.0)
        self._queues[part].appendleft(spec)
        self._queued_n += 1
        self._dirty.add(part)


class StaticLeaseScheduler(Scheduler):
    """Static per-trajectory provisioning: a trajectory leases one of ``n_sandboxes`` sandboxes
    at its first action and holds it until it ends, through all its LLM generation.

    Trajectories that find no free sandbox wait for one, FIFO. Reward-model kinds named in
    ``fleets`` run FIFO on their own fixed fleet. This is how RL frameworks that tie a sandbox to
    a rollout behave once the sandbox service is capped.
    """

    holds_trajectories = True

    def __init__(
        self,
        n_sandboxes: int,
        sandbox: Mapping[str, float],
        fleets: Mapping[str, Mapping[str, float]],
    ) -> None:
        if n_sandboxes < 1:
            raise ValueError(f"n_sandboxes ({n_sandboxes}) must be >= 1")
        self._fleets = set(fleets)
        self._lease: dict[str, str] = {}  # trajectory -> sandbox partition
        self._free = collections.deque(f"sandbox:{i}" for i in range(n_sandboxes))
        self._waiting: collections.OrderedDict[str, list[ActionSpec]] = collections.OrderedDict()
        self._ended: set[str] = set()
        partitions: dict[str, Mapping[str, float]] = dict.fromkeys(self._free, sandbox)
        partitions.update({f"fleet:{k}": fleet for k, fleet in fleets.items()})
        self._inner = PartitionedFifoScheduler(partitions, self._partition_of)
        self.stats = self._inner.stats

    def _partition_of(self, spec: ActionSpec) -> str:
        if spec.kind in self._fleets:
            return f"fleet:{spec.kind}"
        return self._lease[spec.trajectory_id or spec.id]

    def set_capacity(
        self, capacity: Mapping[str, float], limits: Mapping[str, float] | None = None
    ) -> None:
        self._inner.set_capacity(capacity, limits)

    def capacity(self) -> dict[str, float]:
        return self._inner.capacity()

    def usage(self) -> dict[str, float]:
        return self._inner.usage()

    @property
    def queued(self) -> int:
        return self._inner.queued + sum(len(v) for v in self._waiting.values())

    @property
    def running(self) -> int:
        return self._inner.running

    def submit(self, spec: ActionSpec, now: float) -> None:
        owner = spec.trajectory_id or spec.id
        if spec.kind in self._fleets or owner in self._lease:
            self._inner.submit(spec, now)
        else:
            self._waiting.setdefault(owner, []).append(spec)
            self.stats.submitted += 1

    def schedule(self, now: float) -> Plan:
        while self._free and self._waiting:
            owner, specs = self._waiting.popitem(last=False)
            self._lease[owner] = self._free.popleft()
            for spec in specs:
                self._inner.submit(spec, now)
                self._inner.stats.submitted -= 1  # counted once, when it first arrived
        return self._inner.schedule(now)

    def complete(self, action_id: str, now: float, *, succeeded: bool = True) -> None:
        self._inner.complete(action_id, now, succeeded=succeeded)

    def cancel(self, action_id: str) -> bool:
        for owner, specs in self._waiting.items():
            for spec in specs:
                if spec.id == action_id:
                    specs.remove(spec)
                    if not specs:
                        del self._waiting[owner]
                    return True
        return self._inner.cancel(action_id)

    def requeue(self, action_id: str, now: float) -> None:
        self._inner.requeue(action_id, now)

    def trajectory_done(self, trajectory_id: str, now: float) -> None:
        sandbox = self._lease.pop(trajectory_id, None)
        if sandbox is not None:
            self._free.append(sandbox)
            self._inner._dirty.add(sandbox)


def isolated_per_kind(pools: Mapping[str, Mapping[str, float]]) -> PartitionedFifoScheduler:
    """One fixed pool per action kind, FIFO, never lent to another kind."""
    return PartitionedFifoScheduler(pools, lambda spec: spec.kind)
