"""Lower bounds of the mean ACT that any schedule could reach on a trace at a given capacity.

Why: "x times better than static" says nothing about how far a run is from the best possible.
The no-queueing bound (every action starts on arrival on all the units it can use) ignores
capacity, so on a loaded cluster it is far below anything achievable. This module adds a bound
that counts capacity, so that a result can say ``act_over_capacity_bound``.

**The relaxation** (one per resource type r of capacity C_r). Take any feasible schedule. An
action j with single-unit duration T1, speed-up factors f(u) for u in [min_units, max_units]
and per-unit demand d_r, running on u(t) units, progresses at rate 1 / (T1 f(u(t))) and holds
d_r u(t) of r. Give it instead the *rate* rho_j(t) = w_j / (T1 f(u(t))) on a single machine of
speed C_r, where w_j = min_u d_r u T1 f(u) is its least possible r-area. Then:

* rho_j(t) <= d_r u(t), so the rates of all actions sum to at most C_r at every instant;
* rho_j(t) <= w_j / p_j, where p_j = T1 min_u f(u) is its shortest possible run;
* j has received w_j exactly when it completes in the original schedule.

So every schedule maps onto a preemptive single-machine schedule (speed C_r, work w_j,
release at arrival) in which no action completes later. Two lower bounds of that problem:

* **SRPT.** On one machine with preemption and release dates, shortest-remaining-processing-
  time minimises the sum of completion times over all schedules, processor sharing included
  (Schrage, 1968). It ignores the rate caps.
* **Mean busy time.** Let M_j be the mean time at which j receives its work. A rate cap of
  w_j / p_j means j's work spans at least p_j before it completes, so C_j >= M_j + p_j / 2.
  The sum of M_j over one machine's preemptive schedules is least under preemptive
  shortest-*processing*-time first (Goemans, 1997: the mean-busy-time polyhedron is solved by
  preemptive WSPT, here with unit weights). So sum(M_j^SPT + p_j / 2) is a lower bound; it is the
  stronger one where actions cannot use the whole pool (a rigid one-GPU call on 16 GPUs).

Either sum over the actions that use r, plus p_j for each action that does not, bounds the sum
of ACTs; so does the sum of p_j alone (no queueing). The bound is the largest of these sums,
divided by the number of actions.

**The other side: a schedule.** A bound alone cannot say whether a gap is the scheduler's or
the bound's. :func:`list_schedule` builds actual schedules of the same jobs, with the true
durations known in advance (clairvoyant, non-preemptive, greedy: at every arrival and end, start
every waiting job that fits, in one fixed order, each on fixed units: its fastest or its
fewest). Each is feasible, so the best of them is an upper bound of the optimum: the optimum
lies between :func:`capacity_bound` and it, and their ratio is the most the bound can be loose
by. (On the rigid 1/2/4-GPU workload of ``tools/bench/tangram_sim.py`` that ratio is about
1.15: the bound cannot see that a rigid action runs for its whole duration on its units, nor
fragmentation; we found no cheap valid way to tighten it there. Splitting the jobs into busy
periods and taking each period's largest bound gains 0.4%; per-class subsets with the classes'
own usable capacity, floor(C/k)*k, lose far more than they gain, since the classes share the
pool.)

**What "the trace" is.** For an open-loop trace the arrivals are fixed. In a closed loop
(RL steps), arrivals depend on the schedule; :func:`result_jobs` takes the arrivals that the
measured run produced, so the bound is that of the best schedule *for those arrival times*.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tangram_core.scheduler import ActionSpec

if TYPE_CHECKING:
    from tangram_core.sim.engine import SimAction, SimResult

__all__ = [
    "CapacityBound",
    "Job",
    "ListSchedule",
    "best_list_schedule",
    "capacity_bound",
    "list_schedule",
    "mean_busy_sum",
    "result_jobs",
    "srpt_flow_sum",
    "trace_jobs",
]


@dataclass(frozen=True, slots=True)
class Job:
    """One action as the bound sees it: when it arrived, what it is, and its true T(1)."""

    arrival: float
    spec: ActionSpec
    true_t1: float

    @property
    def shortest_run(self) -> float:
        """p_j: its run on the units that make it fastest, with no wait."""
        return self.true_t1 * min(self.spec.factors)

    def least_area(self, resource: str) -> float:
        """w_j: the least unit-seconds of ``resource`` it can complete with."""
        d = dict(self.spec.demand).get(resource, 0.0)
        s = self.spec
        return min(d * u * self.true_t1 * s.factor(u) for u in range(s.min_units, s.max_units + 1))


@dataclass(frozen=True, slots=True)
class CapacityBound:
    """Mean-ACT lower bounds; ``mean`` is the capacity-aware one (never below no-queueing)."""

    mean: float
    no_queueing_mean: float
    per_resource_mean: dict[str, float] = field(default_factory=dict)
    binding: str = "no_queueing"  # which relaxation gave ``mean``
    n: int = 0


def trace_jobs(trace: Iterable[tuple[float, SimAction]]) -> list[Job]:
    """The jobs of an open-loop trace, as :meth:`Simulator.run_trace` takes it."""
    return [Job(t, a.spec, a.true_t1) for t, a in trace]


def result_jobs(result: SimResult) -> list[Job]:
    """The jobs of a finished run, at the arrival times that run produced (see module doc)."""
    return [Job(t, a.spec, a.true_t1) for t, a in zip(result.submit, result.actions, strict=True)]


def srpt_flow_sum(jobs: Sequence[tuple[float, float]]) -> float:
    """Sum of flow times of preemptive SRPT on one unit-speed machine; jobs are (release, work).

    Optimal for the sum of completion times with release dates and preemption, so a lower
    bound of every schedule of the relaxation (see the module docstring)."""
    order = sorted(jobs)
    n, i = len(order), 0
    heap: list[tuple[float, float]] = []  # (remaining work, release)
    t, total = 0.0, 0.0
    while i < n or heap:
        if not heap and t < order[i][0]:
            t = order[i][0]
        while i < n and order[i][0] <= t:
            heapq.heappush(heap, (order[i][1], order[i][0]))
            i += 1
        rem, rel = heapq.heappop(heap)
        next_release = order[i][0] if i < n else math.inf
        if t + rem <= next_release:
            t += rem
            total += t - rel
        else:
            heapq.heappush(heap, (rem - (next_release - t), rel))
            t = next_release
    return total


def mean_busy_sum(jobs: Sequence[tuple[float, float, float]]) -> float:
    """Sum over jobs of (M_j + p_j / 2 - release) under preemptive shortest-processing-time
    first on one unit-speed machine; jobs are (release, work, p_j). See the module docstring."""
    order = sorted(jobs)
    n, i = len(order), 0
    heap: list[tuple[float, int]] = []  # (work, index): priority by the *original* work
    remaining = [w for _, w, _ in order]
    moment = [0.0] * n  # sum over pieces of length * midpoint
    t = 0.0
    while i < n or heap:
        if not heap and t < order[i][0]:
            t = order[i][0]
        while i < n and order[i][0] <= t:
            heapq.heappush(heap, (order[i][1], i))
            i += 1
        work, k = heap[0]
        next_release = order[i][0] if i < n else math.inf
        run = min(remaining[k], next_release - t)
        moment[k] += run * (t + run / 2)
        remaining[k] -= run
        t += run
        if remaining[k] <= 1e-12 * max(work, 1.0):
            heapq.heappop(heap)
    total = 0.0
    for k, (release, work, p) in enumerate(order):
        mean_busy = moment[k] / work if work > 0 else release
        total += mean_busy + p / 2 - release
    return total


def capacity_bound(jobs: Sequence[Job], capacity: Mapping[str, float]) -> CapacityBound:
    """The largest of the no-queueing bound and, per resource, the SRPT and mean-busy-time
    bounds of its single-machine relaxation."""
    n = len(jobs)
    if n == 0:
        return CapacityBound(math.nan, math.nan)
    shortest = [j.shortest_run for j in jobs]
    no_queue = sum(shortest)
    best, binding = no_queue, "no_queueing"
    per_resource: dict[str, float] = {}
    for resource, cap in sorted(capacity.items()):
        if cap <= 0:
            continue
        users: list[tuple[float, float, float]] = []
        others = 0.0
        for job, p in zip(jobs, shortest, strict=True):
            if any(r == resource for r, _ in job.spec.demand):
                users.append((job.arrival, job.least_area(resource) / cap, p))
            else:
                others += p
        if not users:
            continue
        srpt = srpt_flow_sum([(a, w) for a, w, _ in users])
        total = max(srpt, mean_busy_sum(users)) + others
        per_resource[resource] = total / n
        if total > best:
            best, binding = total, resource
    return CapacityBound(best / n, no_queue / n, per_resource, binding, n)


def over_bound(acts: Sequence[float], bound: CapacityBound) -> float:
    """Mean ACT over the capacity bound (>= 1 for any real schedule)."""
    return (sum(acts) / len(acts)) / bound.mean if acts else math.nan


@dataclass(frozen=True, slots=True)
class ListSchedule:
    """A feasible schedule of a list of jobs: per job (in the given order) start, end, units."""

    order: str
    fastest: bool
    start: list[float]
    end: list[float]
    units: list[int]
    arrival: list[float]

    @property
    def mean(self) -> float:
        """Its mean ACT (end - arrival)."""
        n = len(self.end)
        return (
            sum(e - a for e, a in zip(self.end, self.arrival, strict=True)) / n if n else math.nan
        )


def _units(job: Job, capacity: Mapping[str, float], fastest: bool) -> int:
    """The units ``job`` runs on: the fastest (fewest on ties) or the fewest, of those whose
    demand fits the pools."""
    s = job.spec
    best, best_f = -1, math.inf
    for u in range(s.min_units, s.max_units + 1):
        if all(d * u <= capacity.get(r, 0.0) + 1e-9 for r, d in s.demand) and s.factor(u) < best_f:
            best, best_f = u, s.factor(u)
            if not fastest:
                break
    if best < 0:
        raise ValueError(
            f"job {s.id!r} needs {dict(s.demand)} x {s.min_units} unit(s) at its minimum, more "
            f"than the pools {dict(capacity)} hold"
        )
    return best


def list_schedule(
    jobs: Sequence[Job],
    capacity: Mapping[str, float],
    order: str = "shortest",
    *,
    fastest: bool = True,
) -> ListSchedule:
    """Greedy non-preemptive list scheduling with the true durations known in advance.

    Each job runs, without resizes, on the units that make it fastest, or with
    ``fastest=False`` on its fewest (:func:`_units`). At every arrival and every end, the
    waiting jobs are walked in ``order`` and each one that fits every pool starts (so smaller
    ones backfill past one that does not fit). ``order``:
    ``"shortest"`` (true run time), ``"area"`` (true run time x units, the work the
    relaxation counts) or ``"fifo"`` (arrival). The result is a feasible schedule, so its mean
    ACT is at least the optimum's (see the module docstring)."""
    n = len(jobs)
    units = [_units(j, capacity, fastest) for j in jobs]
    run = [j.true_t1 * j.spec.factor(u) for j, u in zip(jobs, units, strict=True)]

    def key(i: int) -> tuple[float, float, int]:
        if order == "shortest":
            return (run[i], jobs[i].arrival, i)
        if order == "area":
            biggest = max((d for _, d in jobs[i].spec.demand), default=1.0)
            return (run[i] * units[i] * biggest, jobs[i].arrival, i)
        if order == "fifo":
            return (jobs[i].arrival, 0.0, i)
        raise ValueError(f"unknown order {order!r}; use 'shortest', 'area' or 'fifo'")

    by_arrival = sorted(range(n), key=lambda i: (jobs[i].arrival, i))
    free = dict(capacity)
    start, end = [math.nan] * n, [math.nan] * n
    waiting: list[tuple[tuple[float, float, int], int]] = []  # sorted by key
    ends: list[tuple[float, int]] = []  # heap of (end, job) of running jobs
    k, t = 0, 0.0
    while k < n or waiting:
        if not waiting and not ends and jobs[by_arrival[k]].arrival > t:
            t = jobs[by_arrival[k]].arrival
        while k < n and jobs[by_arrival[k]].arrival <= t:
            i = by_arrival[k]
            bisect.insort(waiting, (key(i), i))
            k += 1
        kept: list[tuple[tuple[float, float, int], int]] = []
        for entry in waiting:
            i = entry[1]
            need = [(r, d * units[i]) for r, d in jobs[i].spec.demand]
            if all(free.get(r, 0.0) + 1e-9 >= v for r, v in need):
                for r, v in need:
                    free[r] -= v
                start[i], end[i] = t, t + run[i]
                heapq.heappush(ends, (end[i], i))
            else:
                kept.append(entry)
        waiting = kept
        nxt = min(
            ends[0][0] if ends else math.inf, jobs[by_arrival[k]].arrival if k < n else math.inf
        )
        if nxt == math.inf:
            break
        t = nxt
        while ends and ends[0][0] <= t:
            _, i = heapq.heappop(ends)
            for r, d in jobs[i].spec.demand:
                free[r] += d * units[i]
    if any(math.isnan(e) for e in end):
        raise RuntimeError("internal: a job that fits an empty pool was never started")
    return ListSchedule(order, fastest, start, end, units, [j.arrival for j in jobs])


def best_list_schedule(jobs: Sequence[Job], capacity: Mapping[str, float]) -> ListSchedule:
    """The best (least mean ACT) of :func:`list_schedule`'s orders: still a feasible schedule,
    so an upper bound of the optimum, as :func:`capacity_bound` is a lower one."""
    return min(
        (
            list_schedule(jobs, capacity, order, fastest=fastest)
            for order in ("shortest", "area", "fifo")
            for fastest in (True, False)
        ),
        key=lambda s: s.mean,
    )
