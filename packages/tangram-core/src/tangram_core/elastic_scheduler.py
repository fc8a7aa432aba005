"""The elastic scheduler: shortest-estimated-work first, work-conserving, elastic, starvation-free.

The algorithm (our reconstruction of ARL-Tangram's, see ``shared/papers/arl-tangram.md``):

1. **Order.** Queued actions are ranked by
   ``(-priority, T_est(min_units) + aging_rate * submit_time)``.
   This is SRPT with aging: an action's rank improves by ``aging_rate`` seconds per second it
   waits. Because ``now`` is common to every queued action, ageing by
   ``T_est - aging_rate * (now - submit)`` orders exactly like the static key above, so the
   queue is a plain heap and never needs re-sorting.
   With ``order="las"`` the rank is instead the single-unit seconds that the action's
   trajectory has run so far (least attained service, as Libra orders agentic rollouts): no
   estimate needed. Estimates come from :class:`~tangram_core.payload_estimator.PayloadEstimator`
   by default (learned from the action's features), or the caller's, whichever measured better.
2. **Admission.** Actions with the same demand shape (per-unit demand and minimum units) share a
   heap; if the head of a shape does not fit, none of that shape fits. A heap of shape heads
   walks the queue in rank order and starts each head at its minimum units while every resource
   type it needs fits, and it skips (backfills past) shapes that do not fit. So one
   decision costs O(log Q + log G) for Q queued actions and G shapes, not O(Q).
3. **Reservation (EASY backfilling).** Backfilling past a shape that does not fit lets a
   stream of one-unit actions postpone, indefinitely, one that needs several units at once.
   So the first such multi-unit action in rank order that has waited ``reserve_after_s`` gets
   a reservation: by the running actions' estimated ends, when its minimum will be free. Later
   actions start on those resources only if, by estimate, they end before that time or fit in
   the units left over then. The ends are kept in a lazy heap per resource (only once a
   multi-unit shape has arrived), and the reservation is worked out only when some later action
   could actually start, so a saturated queue pays little for it.
4. **Bounded wait.** An action that has waited longer than ``max_wait_s`` goes first, and if it
   does not fit, its resource types are closed to backfilling for that round: it takes the
   next units that free up. No action waits forever behind a stream of smaller ones.
5. **Reclaim.** Units that an elastic action holds above its minimum are borrowed. A queued
   action that does not fit takes them back: the running actions with the smallest marginal loss
   ``R*(f(u-1) - f(u))`` shrink first, and only when that frees enough.
6. **Expansion.** Units that no queued action can use go to elastic actions by largest marginal
   gain ``R*(f(u) - f(u+1))`` (R: estimated remaining single-unit work), greedily from a heap,
   until the gain falls below ``min_gain_s``. Expansion leaves ``expand_reserve`` of each pool
   free, so that arrivals start at once instead of reclaiming: on a busy cluster this cuts
   resize churn (each resize is a real call to a manager) by an order of magnitude.

Complexity per ``schedule`` call: O((S + G) log(Q + G) + E log E), with S starts, E elastic
actions considered for expansion (only when capacity is free) and G shapes.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tangram_core.estimator import DurationEstimator
from tangram_core.payload_estimator import PayloadEstimator
from tangram_core.scheduler import (
    EMPTY_PLAN,
    ActionSpec,
    CapacityError,
    Plan,
    Resize,
    Scheduler,
    SchedulerStats,
    Start,
)

_EPS = 1e-9
Shape = tuple[tuple[tuple[str, float], ...], int]


@functools.lru_cache(maxsize=4096)
def _resources(demand: tuple[tuple[str, float], ...]) -> frozenset[str]:
    return frozenset(r for r, _ in demand)


@functools.lru_cache(maxsize=4096)
def _multi_unit(shape: Shape) -> bool:
    """Whether an action of this shape needs more than one unit of some resource at once: such
    an action waits for several units to be free together, so smaller ones can starve it."""
    demand, min_units = shape
    return any(d * min_units > 1.0 + _EPS for _, d in demand)


class ElasticConfig(BaseModel):
    """Tuning of :class:`ElasticScheduler`; every field has a safe default."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    aging_rate: float = Field(
        0.05,
        ge=0.0,
        description="Seconds of rank an action gains per second it waits (0 = pure SRPT).",
    )
    order: Literal["srpt", "las"] = Field(
        "srpt",
        description="Queue order: 'srpt' ranks by estimated run time (shortest first); 'las' "
        "(least attained service, as Libra orders agentic rollouts) ranks by the single-unit "
        "seconds its trajectory's actions have run so far, and needs no estimate.",
    )
    max_wait_s: float = Field(
        300.0, gt=0, description="Past this wait an action goes first and blocks backfilling."
    )
    expand: bool = Field(True, description="Give spare units to elastic actions.")
    resize_running: bool = Field(
        True,
        description="Grow and shrink actions that are already running; the manager must support "
        "it. When off, units are chosen at start only.",
    )
    min_gain_s: float = Field(
        1e-3, ge=0.0, description="Smallest expected saving (s) worth one more unit."
    )
    reserve: bool = Field(
        True,
        description="EASY backfilling: the first action in rank order that needs more than one "
        "unit of a resource and does not fit gets a reserved start (when, by the estimates, "
        "enough units will be free); others start on that resource only if they finish before "
        "it by estimate, or fit in the units left over at that time.",
    )
    reserve_after_s: float = Field(
        10.0,
        ge=0.0,
        description="How long a multi-unit action waits before it gets a reservation. Before "
        "that, smaller actions may start in front of it (better mean ACT on bursts); after, its "
        "wait is bounded by this plus the time for enough running actions to end, far below "
        "max_wait_s. 0: reserve at once (classic EASY).",
    )
    expand_reserve: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of each pool (rounded down to whole units) that expansion leaves free "
        "for new arrivals, so that they start without reclaiming: fewer resize calls.",
    )


@dataclass(slots=True, eq=False)
class _Queued:
    spec: ActionSpec
    submit_time: float
    key: tuple[int, float, int]
    est_t1: float
    alive: bool = True


@dataclass(slots=True, eq=False)
class _Running:
    spec: ActionSpec
    submit_time: float
    key: tuple[int, float, int]
    est_t1: float
    units: int
    seg_start: float
    t1_done: float = 0.0
    fu: float = 1.0  # T(units)/T(1), cached: this is on the simulator's hot path
    fixed: bool = False  # its manager refused a resize: never grow or shrink it again
    end_seq: int = -1  # the seq of its current entry in the scheduler's `_ends` heaps

    def remaining_t1(self, now: float) -> float:
        done = self.t1_done + (now - self.seg_start) / self.fu
        return max(self.est_t1 - done, 0.05 * self.est_t1)

    def resize(self, units: int, now: float) -> None:
        self.t1_done += (now - self.seg_start) / self.fu
        self.seg_start = now
        self.units = units
        self.fu = self.spec.factors[units - self.spec.min_units]


@dataclass(slots=True)
class _Round:
    """What one ``schedule`` call has decided so far, and which resources it has ruled out."""

    starts: dict[str, int] = field(default_factory=dict)
    resizes: dict[str, int] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)  # reserved for a starving action
    blocked: set[str] = field(default_factory=set)  # some queued action could not get them
    # EASY reservations: resource -> [reserved start, units left over at that start]
    reserved: dict[str, list[float]] = field(default_factory=dict)


class ElasticScheduler(Scheduler):
    """ARL-Tangram's action-level elastic scheduler. Pure: no clock, no I/O, deterministic."""

    def __init__(
        self,
        capacity: Mapping[str, float],
        *,
        config: ElasticConfig | None = None,
        estimator: DurationEstimator | None = None,
        limits: Mapping[str, float] | None = None,
    ) -> None:
        self.config = config or ElasticConfig()
        self.estimator = estimator or PayloadEstimator()
        self.stats = SchedulerStats()
        self._cap: dict[str, float] = {}
        self._limits: dict[str, float] = {}
        self._used: dict[str, float] = {}
        # Per shape, a heap of (key, item): keys are unique, so items are never compared.
        self._shapes: dict[Shape, list[tuple[tuple[int, float, int], _Queued]]] = {}
        self._by_submit: list[tuple[float, int, _Queued]] = []
        # Shapes whose head did not fit; they stay out of admission until a resource they need
        # is released (`_freed`), since nothing else can make them fit.
        self._stuck: set[Shape] = set()
        self._freed: set[str] = set()
        self._queued: dict[str, _Queued] = {}
        self._running: dict[str, _Running] = {}
        # Units held above their minimum are borrowed, and reclaim can take them back.
        # `_borrowed` totals them per resource type (an O(1) feasibility check); `_lenders` holds,
        # per demand shape, a min-heap of (loss at push time, seq, id, units). Losses only fall as
        # an action progresses, so the order is approximate but every entry is re-validated.
        self._borrowed: dict[str, float] = {}
        self._lenders: dict[tuple[tuple[str, float], ...], list[tuple[float, int, str, int]]] = {}
        # Per demand shape, a lazy max-heap of (-gain, seq, id, units) for runs that could grow.
        # A stored gain is an upper bound of the current one (remaining work only falls while
        # units stay fixed), so a popped entry is re-evaluated and pushed back if another may now
        # beat it. One heap per shape lets a shape whose resources are exhausted be skipped whole.
        self._growable: dict[tuple[tuple[str, float], ...], list[tuple[float, int, str, int]]] = {}
        # Per resource, a lazy min-heap of (estimated end, seq, id) of running actions, for EASY
        # reservations; an entry is current while its seq is the run's `end_seq`.
        self._ends: dict[str, list[tuple[float, int, str]]] = {}
        self._track_ends = False  # only once a multi-unit shape arrives: it costs every start
        self._attained: dict[str, float] = {}  # trajectory -> T(1)-seconds run so far (LAS)
        self._las = self.config.order == "las"  # read on every enqueue and completion
        self._seq = itertools.count()
        self._no_growth = True  # no growable entry exists: `_expand` has nothing to look at
        self._dirty = True
        self.set_capacity(capacity, limits)

    # -- state changes ---------------------------------------------------------------------------

    def set_capacity(
        self, capacity: Mapping[str, float], limits: Mapping[str, float] | None = None
    ) -> None:
        bad = {r: v for r, v in capacity.items() if v < 0}
        if bad:
            raise ValueError(f"capacity must be >= 0 for every resource type; got {bad}")
        self._cap = dict(capacity)
        self._limits = dict(limits) if limits is not None else dict(capacity)
        self._valid_shapes: set[Shape] = set()  # shapes that passed `submit`'s checks
        self._freed.update(self._cap)
        reserve = self.config.expand_reserve
        self._expand_cap = {r: c - math.floor(reserve * c) for r, c in self._cap.items()}
        for r in self._cap:
            self._used.setdefault(r, 0.0)
        self._dirty = True

    def submit(self, spec: ActionSpec, now: float) -> None:
        if spec.id in self._queued or spec.id in self._running:
            raise ValueError(f"action {spec.id!r} was submitted twice")
        shape = (spec.demand, spec.min_units)
        if shape not in self._valid_shapes:
            self._check_limits(spec)
            self._valid_shapes.add(shape)
            if self.config.reserve and not self._track_ends and _multi_unit(shape):
                self._start_tracking_ends(now)
        est = self.estimator.estimate_spec(spec)
        self._enqueue(spec, now, est)
        self.stats.submitted += 1

    def _check_limits(self, spec: ActionSpec) -> None:
        for resource, per_unit in spec.demand:
            need = per_unit * spec.min_units
            limit = self._limits.get(resource)
            if limit is None:
                raise CapacityError(
                    f"action {spec.id!r} ({spec.kind}) needs resource {resource!r}, which no "
                    f"pool provides; known resources: {sorted(self._limits)}"
                )
            if need > limit + _EPS:
                raise CapacityError(
                    f"action {spec.id!r} ({spec.kind}) needs {need:g} {resource} at its minimum "
                    f"of {spec.min_units} unit(s), more than the pool can ever hold ({limit:g}); "
                    f"lower min_units or the per-unit demand, or raise the pool's limit"
                )

    def _enqueue(self, spec: ActionSpec, submit_time: float, est_t1: float) -> None:
        if self._las:
            served = self._attained.get(spec.trajectory_id, 0.0) if spec.trajectory_id else 0.0
            rank = served + self.config.aging_rate * submit_time
        else:
            rank = est_t1 * spec.factors[0] + self.config.aging_rate * submit_time
        seq = next(self._seq)
        item = _Queued(spec, submit_time, (-spec.priority, rank, seq), est_t1)
        self._queued[spec.id] = item
        heapq.heappush(self._shapes.setdefault((spec.demand, spec.min_units), []), (item.key, item))
        heapq.heappush(self._by_submit, (submit_time, seq, item))
        self._dirty = True

    def complete(self, action_id: str, now: float, *, succeeded: bool = True) -> None:
        run = self._running.pop(action_id, None)
        if run is None:
            raise KeyError(f"complete({action_id!r}): no such running action")
        self._lend(run, run.units, 0)
        self._release(run.spec, run.units)
        run.resize(run.units, now)  # folds the last segment into t1_done
        if succeeded:
            self.estimator.observe_spec(run.spec, run.t1_done)
        traj = run.spec.trajectory_id
        if traj is not None and self._las:
            self._attained[traj] = self._attained.get(traj, 0.0) + run.t1_done
        self.stats.completed += 1
        self._dirty = True

    def requeue(self, action_id: str, now: float) -> None:
        run = self._running.pop(action_id, None)
        if run is None:
            raise KeyError(f"requeue({action_id!r}): no such running action")
        self._lend(run, run.units, 0)
        self._release(run.spec, run.units)
        self._enqueue(run.spec, run.submit_time, run.est_t1)

    def resize_refused(self, action_id: str, units: int, now: float) -> None:
        run = self._running.get(action_id)
        if run is None or run.fixed:
            return  # it ended meanwhile, or was already put back
        if units != run.units:
            if units > run.units:
                self._take(run.spec, units - run.units)
            else:
                self._release(run.spec, run.units - units)
            self._lend(run, run.units, units)
            run.resize(units, now)
        # Out of expansion and reclaim: its units above the minimum are no longer lendable.
        self._lend(run, run.units, 0)
        run.fixed = True
        self.stats.resizes_refused += 1
        self._dirty = True

    def trajectory_done(self, trajectory_id: str, now: float) -> None:
        self._attained.pop(trajectory_id, None)

    def cancel(self, action_id: str) -> bool:
        item = self._queued.pop(action_id, None)
        if item is None:
            return False
        item.alive = False
        self.stats.cancelled += 1
        self._dirty = True
        return True

    # -- queries ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._running)

    def usage(self) -> dict[str, float]:
        return dict(self._used)

    def capacity(self) -> dict[str, float]:
        return dict(self._cap)

    def running_units(self, action_id: str) -> int | None:
        run = self._running.get(action_id)
        return None if run is None else run.units

    def queued_demand(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for item in self._queued.values():
            for r, d in item.spec.demand:
                total[r] = total.get(r, 0.0) + d * item.spec.min_units
        return total

    def queued_work_s(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for item in self._queued.values():
            for r, d in item.spec.demand:
                total[r] = total.get(r, 0.0) + item.est_t1 * d
        return total

    # -- the decision ----------------------------------------------------------------------------

    def schedule(self, now: float) -> Plan:
        self.stats.schedule_calls += 1
        if not self._dirty or (not self._queued and not self._has_free()):
            self._dirty = False
            return EMPTY_PLAN
        self._dirty = False
        rnd = _Round()
        self._admit_starving(now, rnd)
        self._admit_in_rank_order(now, rnd)
        if self.config.expand:
            self._expand(now, rnd)
        if not rnd.starts and not rnd.resizes:
            return EMPTY_PLAN
        self.stats.started += len(rnd.starts)
        self.stats.resizes += len(rnd.resizes)
        return Plan(
            starts=tuple(itertools.starmap(Start, rnd.starts.items())),
            resizes=tuple(itertools.starmap(Resize, rnd.resizes.items())),
        )

    def _has_free(self) -> bool:
        used = self._used
        for r, c in self._cap.items():  # noqa: SIM110 - hot path, see _fits
            if c - used.get(r, 0.0) > _EPS:
                return True
        return False

    def _fits(self, demand: tuple[tuple[str, float], ...], units: int) -> bool:
        cap, used = self._cap, self._used
        for r, d in demand:  # noqa: SIM110 - a plain loop: ~2x faster than all() on this hot path
            if used.get(r, 0.0) + d * units > cap.get(r, 0.0) + _EPS:
                return False
        return True

    def _fits_expansion(self, demand: tuple[tuple[str, float], ...]) -> bool:
        cap, used = self._expand_cap, self._used
        for r, d in demand:  # noqa: SIM110 - hot path, see _fits
            if used.get(r, 0.0) + d > cap.get(r, 0.0) + _EPS:
                return False
        return True

    def _take(self, spec: ActionSpec, units: int) -> None:
        for r, d in spec.demand:
            self._used[r] = self._used.get(r, 0.0) + d * units

    def _release(self, spec: ActionSpec, units: int) -> None:
        for r, d in spec.demand:
            self._freed.add(r)
            self._used[r] = max(self._used.get(r, 0.0) - d * units, 0.0)

    def _start(self, item: _Queued, now: float, rnd: _Round) -> None:
        spec = item.spec
        del self._queued[spec.id]
        item.alive = False
        self._take(spec, spec.min_units)
        run = _Running(
            spec, item.submit_time, item.key, item.est_t1, spec.min_units, now, fu=spec.factors[0]
        )
        self._running[spec.id] = run
        rnd.starts[spec.id] = spec.min_units
        if self._track_ends:
            self._push_end(run, now)
        self._push_growable(run, now)
        kinds = self.stats.by_kind_started
        kinds[spec.kind] = kinds.get(spec.kind, 0) + 1

    def _try_start(self, item: _Queued, now: float, rnd: _Round) -> bool:
        spec = item.spec
        if self._fits(spec.demand, spec.min_units) or self._reclaim(spec, now, rnd):
            self._start(item, now, rnd)
            return True
        return False

    def _admit_starving(self, now: float, rnd: _Round) -> None:
        horizon = now - self.config.max_wait_s
        heap = self._by_submit
        kept: list[tuple[float, int, _Queued]] = []
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            item = entry[2]
            if not item.alive:
                continue
            needs = _resources(item.spec.demand)
            if needs & rnd.closed or not self._try_start(item, now, rnd):
                rnd.closed |= needs
                rnd.blocked |= needs
                kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)

    def _admit_in_rank_order(self, now: float, rnd: _Round) -> None:
        if self._freed:
            self._unstick(self._freed)
            self._freed = set()
        # Reservations need the ends of running actions, tracked once a multi-unit shape exists.
        reserve, reserve_after = self._track_ends, self.config.reserve_after_s
        stuck = self._stuck
        heads: list[tuple[tuple[int, float, int], Shape]] = []
        for shape, heap in self._shapes.items():
            if shape in stuck and not (reserve and _multi_unit(shape)):
                rnd.blocked |= _resources(shape[0])
                continue  # a stuck single-unit shape can neither start nor reserve
            while heap and not heap[0][1].alive:
                heapq.heappop(heap)
            if heap:
                heads.append((heap[0][0], shape))
        heapq.heapify(heads)
        reserved = rnd.reserved
        holder: _Queued | None = None  # the first blocked multi-unit action, once found
        holder_needs: frozenset[str] = frozenset()
        while heads:
            _, shape = heapq.heappop(heads)
            heap = self._shapes[shape]
            item = heap[0][1]
            needs = _resources(shape[0])
            if needs & rnd.closed:
                rnd.blocked |= needs
                continue  # reserved for a starving action this round
            leftover = None
            if holder is not None and not needs.isdisjoint(holder_needs):
                todo = needs & holder_needs
                if not todo.issubset(reserved) and self._could_start(shape):
                    # Worked out only now, and only on the resources this action wants, when it
                    # could really take units: under load most candidates do not fit anyway,
                    # and each resource's reservation costs a walk of its heap of ends.
                    self._reserve(holder, now, reserved, todo)
            if reserved and not needs.isdisjoint(reserved):
                leftover = self._backfill_use(item, now, reserved)
                if leftover is None:
                    rnd.blocked |= needs
                    continue  # it would delay a reserved start; not stuck: it may fit later
            if shape in stuck or not self._try_start(item, now, rnd):
                rnd.blocked |= needs
                stuck.add(shape)
                if (
                    reserve
                    and holder is None
                    and now - item.submit_time >= reserve_after
                    and _multi_unit(shape)
                ):
                    holder, holder_needs = item, needs
                continue  # the whole shape waits until one of its resources is released
            if leftover:
                for r, used in leftover:
                    reserved[r][1] -= used
            heapq.heappop(heap)
            while heap and not heap[0][1].alive:
                heapq.heappop(heap)
            if heap:
                heapq.heappush(heads, (heap[0][0], shape))
            else:
                del self._shapes[shape]

    # -- EASY reservations -----------------------------------------------------------------------

    def _could_start(self, shape: Shape) -> bool:
        """Whether an action of ``shape`` fits now, or could by reclaiming borrowed units."""
        demand = shape[0]
        if self._fits(demand, shape[1]):
            return True
        borrowed = self._borrowed
        for r, _ in demand:  # noqa: SIM110 - hot path, see _fits
            if borrowed.get(r, 0.0) > _EPS:
                return True
        return False

    def _start_tracking_ends(self, now: float) -> None:
        """The first multi-unit shape arrived: record the ends of what already runs."""
        self._track_ends = True
        for run in self._running.values():
            self._push_end(run, now)

    def _push_end(self, run: _Running, now: float) -> None:
        """Record a running action's estimated end, for the reservations of blocked actions."""
        seq = next(self._seq)
        run.end_seq = seq
        end = now + run.remaining_t1(now) * run.fu
        for r, _ in run.spec.demand:
            heap = self._ends.setdefault(r, [])
            heapq.heappush(heap, (end, seq, run.spec.id))
            if len(heap) > 2 * len(self._running) + 64:  # drop stale entries now and then
                live = [e for e in heap if self._end_is_current(e)]
                heapq.heapify(live)
                self._ends[r] = live

    def _end_is_current(self, entry: tuple[float, int, str]) -> bool:
        run = self._running.get(entry[2])
        return run is not None and run.end_seq == entry[1]

    def _reserve(
        self,
        item: _Queued,
        now: float,
        reserved: dict[str, list[float]],
        only: frozenset[str],
    ) -> None:
        """Reserve, on each resource in ``only`` that ``item`` needs, the earliest time by the
        estimates at which its minimum will be free, and note how much will be left over then.

        Units that elastic actions hold above their minimum count as free: reclaim takes them
        back. If running actions can never free enough (the pool shrank), the reservation is
        at infinity: it holds nothing back.
        """
        spec = item.spec
        running = self._running
        for r, d in spec.demand:
            if r not in only or r in reserved:
                continue
            need = d * spec.min_units
            free = self._cap.get(r, 0.0) - self._used.get(r, 0.0) + self._borrowed.get(r, 0.0)
            heap = self._ends.get(r, [])
            popped: list[tuple[float, int, str]] = []
            shadow = now
            while free + _EPS < need and heap:
                entry = heapq.heappop(heap)
                run = running.get(entry[2])
                if run is None or run.end_seq != entry[1]:
                    continue  # stale: the run ended or was re-timed; drop it for good
                popped.append(entry)
                units = run.units if run.fixed else run.spec.min_units
                for r2, d2 in run.spec.demand:
                    if r2 == r:
                        free += d2 * units
                if entry[0] > shadow:
                    shadow = entry[0]
            for entry in popped:
                heapq.heappush(heap, entry)
            if free + _EPS >= need:
                reserved[r] = [shadow, free - need]
            else:
                reserved[r] = [math.inf, math.inf]

    def _backfill_use(
        self, item: _Queued, now: float, reserved: dict[str, list[float]]
    ) -> list[tuple[str, float]] | None:
        """Whether ``item`` may start on reserved resources: ``None`` if it would delay a
        reserved start; else the left-over units it takes per resource (empty if it ends first)."""
        spec = item.spec
        end = now + item.est_t1 * spec.factors[0]
        uses: list[tuple[str, float]] = []
        for r, d in spec.demand:
            slot = reserved.get(r)
            if slot is None or end <= slot[0]:
                continue
            need = d * spec.min_units
            if need > slot[1] + _EPS:
                return None
            uses.append((r, need))
        return uses

    def _unstick(self, freed: set[str]) -> None:
        """Re-admit the stuck shapes that a release may have made startable.

        A shape stays stuck while its minimum still does not fit and none of its resources has
        borrowed units to reclaim: trying it again would fail the same way, and on a saturated
        pool every completion would otherwise re-try every shape.
        """
        borrowed = self._borrowed
        still: set[Shape] = set()
        for shape in self._stuck:
            demand, min_units = shape
            touched = lendable = False
            for r, _ in demand:  # one plain loop: this runs on every completion
                if r in freed:
                    touched = True
                if borrowed.get(r, 0.0) > _EPS:
                    lendable = True
            if not (touched and (lendable or self._fits(demand, min_units))):
                still.add(shape)
        self._stuck = still

    def _reclaim(self, spec: ActionSpec, now: float, rnd: _Round) -> bool:
        """Shrink borrowed units (above their minimum) so that ``spec`` fits; all or nothing."""
        borrowed = self._borrowed
        if self.config.resize_running:
            for r, _ in spec.demand:
                if borrowed.get(r, 0.0) > _EPS:
                    break
            else:
                return False  # the common case under load: nothing to take back
        deficit = {
            r: self._used.get(r, 0.0) + d * spec.min_units - self._cap.get(r, 0.0)
            for r, d in spec.demand
        }
        deficit = {r: v for r, v in deficit.items() if v > _EPS}
        if not deficit:
            return True
        if not self.config.resize_running:
            return self._reclaim_from_new_starts(deficit, now, rnd)
        if any(self._borrowed.get(r, 0.0) + _EPS < need for r, need in deficit.items()):
            return False
        heads = [
            (heap[0][0], next(self._seq), shape)
            for shape, heap in self._lenders.items()
            if heap and any(r in deficit for r, _ in shape)
        ]
        heapq.heapify(heads)
        while any(v > _EPS for v in deficit.values()):
            if not heads:
                raise RuntimeError(f"internal: borrowed-unit totals {self._borrowed} overstate")
            _, _, shape = heapq.heappop(heads)
            heap = self._lenders[shape]
            _, _, run_id, units = heapq.heappop(heap)
            run = self._running.get(run_id)
            if (
                run is not None
                and not run.fixed
                and run.units == units
                and units > run.spec.min_units
            ):
                self._release(run.spec, 1)
                self._set_units(run, units - 1, now, rnd)
                for r, d in shape:
                    if r in deficit:
                        deficit[r] -= d
            if heap:
                heapq.heappush(heads, (heap[0][0], next(self._seq), shape))
        return True

    def _reclaim_from_new_starts(self, deficit: dict[str, float], now: float, rnd: _Round) -> bool:
        """Without running resizes, only actions started in this round can still give units."""
        lenders = [self._running[a] for a in rnd.starts]
        lenders = [r for r in lenders if r.units > r.spec.min_units]
        for r in deficit:
            spare = sum(
                dict(x.spec.demand).get(r, 0.0) * (x.units - x.spec.min_units) for x in lenders
            )
            if spare + _EPS < deficit[r]:
                return False
        while any(v > _EPS for v in deficit.values()):
            run = min(
                (x for x in lenders if x.units > x.spec.min_units),
                key=lambda x: self._loss(x, now),
            )
            self._release(run.spec, 1)
            self._set_units(run, run.units - 1, now, rnd)
            for r, d in run.spec.demand:
                if r in deficit:
                    deficit[r] -= d
        return True

    def _lend(self, run: _Running, old_units: int, new_units: int) -> None:
        """Keep `_borrowed` exact when a run's borrowed units change (new_units 0: it ended)."""
        if run.fixed:
            return  # its borrowed units left the totals when it was fixed
        spec = run.spec
        old_extra = max(old_units - spec.min_units, 0)
        new_extra = max(new_units - spec.min_units, 0)
        if old_extra != new_extra:
            for r, d in spec.demand:
                self._borrowed[r] = self._borrowed.get(r, 0.0) + d * (new_extra - old_extra)

    @staticmethod
    def _loss(run: _Running, now: float) -> float:
        i = run.units - run.spec.min_units  # >= 1: only borrowers are asked
        return run.remaining_t1(now) * (run.spec.factors[i - 1] - run.fu)

    def _set_units(self, run: _Running, units: int, now: float, rnd: _Round) -> None:
        self._lend(run, run.units, units)
        run.resize(units, now)
        if self._track_ends:
            self._push_end(run, now)
        if run.spec.id in rnd.starts:
            rnd.starts[run.spec.id] = units
        else:
            rnd.resizes[run.spec.id] = units
        if units > run.spec.min_units:
            heap = self._lenders.setdefault(run.spec.demand, [])
            heapq.heappush(heap, (self._loss(run, now), next(self._seq), run.spec.id, units))
        self._push_growable(run, now)

    @staticmethod
    def _gain(run: _Running, now: float) -> float:
        """Expected seconds saved by one more unit; callers ensure units < max_units."""
        i = run.units - run.spec.min_units
        return run.remaining_t1(now) * (run.fu - run.spec.factors[i + 1])

    def _push_growable(self, run: _Running, now: float) -> None:
        if run.units < run.spec.max_units and not run.fixed:
            gain = self._gain(run, now)
            if gain >= self.config.min_gain_s:
                heap = self._growable.setdefault(run.spec.demand, [])
                heapq.heappush(heap, (-gain, next(self._seq), run.spec.id, run.units))
                self._no_growth = False

    def _expand(self, now: float, rnd: _Round) -> None:
        if self._no_growth:
            return  # no candidate is left, and none has been added since
        grow_running = self.config.resize_running
        min_gain = self.config.min_gain_s
        cap, used, running, seq = self._expand_cap, self._used, self._running, self._seq
        shut = rnd.blocked | rnd.closed

        def room(demand: tuple[tuple[str, float], ...]) -> bool:
            for r, d in demand:  # noqa: SIM110 - hot path, see _fits
                if used.get(r, 0.0) + d > cap.get(r, 0.0) + _EPS:
                    return False
            return True

        heads: list[tuple[float, int, tuple[tuple[str, float], ...]]] = []
        for demand, heap in self._growable.items():
            if heap and room(demand) and (not shut or shut.isdisjoint(_resources(demand))):
                heads.append((heap[0][0], next(seq), demand))
        heapq.heapify(heads)
        while heads:
            _, _, demand = heapq.heappop(heads)
            heap = self._growable[demand]
            if not heap or not room(demand):
                continue  # this shape's resources are used up
            _, _, run_id, entry_units = heapq.heappop(heap)
            run = running.get(run_id)
            if run is not None and run.units == entry_units and not run.fixed:
                if not grow_running and run_id not in rnd.starts:
                    pass  # started in an earlier round; its units are fixed: drop the entry
                else:
                    spec = run.spec
                    i = entry_units - spec.min_units
                    # remaining_t1, inlined: this loop is most of a busy simulation's time
                    done = run.t1_done + (now - run.seg_start) / run.fu
                    rem = run.est_t1 - done
                    if rem < 0.05 * run.est_t1:
                        rem = 0.05 * run.est_t1
                    gain = rem * (run.fu - spec.factors[i + 1])
                    best_other = -heads[0][0] if heads else 0.0
                    if gain < min_gain or gain != gain:  # NaN: drop as well
                        pass  # gains only fall with time at fixed units: drop for good
                    elif (heap and gain < -heap[0][0]) or gain < best_other:
                        heapq.heappush(heap, (-gain, next(seq), run_id, entry_units))
                    else:
                        # Marginal gains fall with units, so keep adding to this action while
                        # its next unit still beats every other candidate: one heap push total.
                        bar = max(best_other, -heap[0][0] if heap else 0.0, min_gain)
                        units = entry_units
                        while True:
                            self._take(spec, 1)
                            units += 1
                            if units >= spec.max_units or not room(spec.demand):
                                break
                            i = units - spec.min_units
                            if rem * (spec.factors[i] - spec.factors[i + 1]) < bar:
                                break
                        self._set_units(run, units, now, rnd)
            if heap:
                heapq.heappush(heads, (heap[0][0], next(seq), demand))
        # Gains only fall while units stay fixed, so with every heap empty nothing can grow
        # until `_push_growable` adds a candidate: later rounds skip this walk entirely.
        self._no_growth = not any(self._growable.values())
