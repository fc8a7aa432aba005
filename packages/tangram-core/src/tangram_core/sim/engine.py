"""A discrete-event simulator that drives the real scheduler objects on a virtual clock.

Why: the claims we must reproduce (ACT, RL step time, resources at equal ACT) are about clusters
of thousands of cores, which no test machine has. The simulator runs the *same* scheduler
object the runtime uses, since schedulers are pure and take ``now``. Only the workers are virtual:
an action's run time is its true single-unit duration times the speed-up factor of the units
the scheduler gave it, re-timed whenever it is resized.

Two workload shapes:

* **closed-loop RL steps**: each trajectory alternates LLM generation and actions; an action
  arrives only when the generation before it ends, and the next turn waits for it. A step ends
  when its last trajectory ends (synchronous GRPO), and the next step then starts.
* **open-loop traces**: actions arrive at fixed times (recorded JSONL traces).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tangram_core.autoscaling.simulated import PoolTracker, SimAutoscaling
from tangram_core.scheduler import ActionSpec, Scheduler

_TURN = 1  # a trajectory finished generating: issue its turn's actions (or finish)
_FINISH = 2  # an action finished (if its version is still current)
_SCALE = 3  # autoscaling: size the pools
_READY = 4  # autoscaling: units asked for warmup_s ago are usable


@dataclass(frozen=True, slots=True)
class SimAction:
    """An action plus what the simulator knows and the scheduler does not: its true T(1)."""

    spec: ActionSpec
    true_t1: float


@dataclass(frozen=True, slots=True)
class Turn:
    """LLM generation for ``gen_s`` seconds, then ``actions`` issued together and awaited."""

    gen_s: float
    actions: tuple[SimAction, ...] = ()


@dataclass(frozen=True, slots=True)
class TrajectoryPlan:
    id: str
    turns: tuple[Turn, ...]


@dataclass(slots=True)
class SimResult:
    """Per-action timings (parallel lists) and per-step durations of one run."""

    name: str
    kinds: list[str] = field(default_factory=list)
    actions: list[SimAction] = field(default_factory=list)  # for bounds at the run's arrivals
    submit: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    units: list[float] = field(default_factory=list)  # average units held while running
    step_durations: list[float] = field(default_factory=list)
    makespan: float = 0.0
    capacity: dict[str, float] = field(default_factory=dict)
    busy_unit_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    schedule_calls: int = 0
    # Unit-seconds paid per autoscaled resource (ready or warming); empty without autoscaling.
    provisioned: dict[str, float] = field(default_factory=dict)

    @property
    def n_actions(self) -> int:
        return len(self.end)

    def acts(self, kind_prefix: str = "") -> list[float]:
        return [
            e - s
            for k, s, e in zip(self.kinds, self.submit, self.end, strict=True)
            if k.startswith(kind_prefix)
        ]

    def resource_seconds(self) -> dict[str, float]:
        """What was provisioned: capacity held for the whole run (the cost that static pays),
        or, for an autoscaled resource, the unit-seconds its pool actually held."""
        fixed = {r: c * self.makespan for r, c in self.capacity.items()}
        return {**fixed, **self.provisioned}

    def utilisation(self) -> dict[str, float]:
        prov = self.resource_seconds()
        return {r: self.busy_unit_seconds.get(r, 0.0) / v for r, v in prov.items() if v > 0}


class ActionRunner:
    """Carries out a scheduler's plans on a virtual clock: the part of a simulation about actions.

    Why a class of its own: the step simulator here and the RL-loop model (:mod:`.rl_loop`) both
    run external actions the same way, and only differ in what produces them. The caller owns
    the event heap; ``push(time, action_id, version)`` asks it for a finish event, and the caller
    hands each one back to :meth:`finish`. A resize re-times the action and bumps its version,
    so the older finish event is recognised as stale and ignored.
    """

    __slots__ = ("_push", "busy", "last_spec", "res", "running", "sched", "waiting")

    def __init__(
        self,
        scheduler: Scheduler,
        result: SimResult,
        push: Callable[[float, str, int], None],
    ) -> None:
        self.sched = scheduler
        self.res = result
        self._push = push
        # action id -> [sim action, units, seg_start, remaining true T(1), version, index,
        #               unit-seconds held before seg_start]
        self.running: dict[str, list[Any]] = {}
        self.waiting: dict[str, tuple[SimAction, int]] = {}  # submitted, not started
        self.busy = dict.fromkeys(result.capacity, 0.0)
        self.last_spec: ActionSpec | None = None  # the spec of the action that last finished

    def submit(self, action: SimAction, now: float) -> None:
        res = self.res
        index = len(res.end)
        res.kinds.append(action.spec.kind)
        res.actions.append(action)
        res.submit.append(now)
        res.start.append(now)
        res.end.append(now)
        res.units.append(0.0)
        self.waiting[action.spec.id] = (action, index)
        self.sched.submit(action.spec, now)

    def finish(self, action_id: str, version: int, now: float) -> bool:
        """Handle a finish event; False if it is stale (the action was re-timed since)."""
        run = self.running.get(action_id)
        if run is None or run[4] != version:
            return False
        del self.running[action_id]
        sim_action, units = run[0], run[1]
        self.last_spec = sim_action.spec
        busy = self.busy
        for r, d in sim_action.spec.demand:
            busy[r] = busy.get(r, 0.0) + d * units * (now - run[2])
        res = self.res
        index = run[5]
        res.end[index] = now
        unit_s = run[6] + units * (now - run[2])
        ran = now - res.start[index]
        res.units[index] = unit_s / ran if ran > 0 else float(units)
        self.sched.complete(action_id, now)
        return True

    def plan(self, now: float) -> None:
        """Ask the scheduler what to do now, and do it: start actions, resize running ones."""
        plan = self.sched.schedule(now)
        running, push = self.running, self._push
        for st in plan.starts:
            action, index = self.waiting.pop(st.action_id)
            self.res.start[index] = now
            running[st.action_id] = [action, st.units, now, action.true_t1, 0, index, 0.0]
            spec = action.spec  # the scheduler keeps units in [min_units, max_units]
            push(now + action.true_t1 * spec.factors[st.units - spec.min_units], st.action_id, 0)
        for rz in plan.resizes:
            run = running[rz.action_id]
            action, old = run[0], run[1]
            for r, d in action.spec.demand:
                self.busy[r] = self.busy.get(r, 0.0) + d * old * (now - run[2])
            spec = action.spec
            run[3] = max(run[3] - (now - run[2]) / spec.factors[old - spec.min_units], 0.0)
            run[6] += old * (now - run[2])
            run[1], run[2] = rz.units, now
            run[4] += 1
            push(now + run[3] * spec.factors[rz.units - spec.min_units], rz.action_id, run[4])


class Simulator:
    """Runs workloads against one scheduler; deterministic for a given scheduler and workload."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        name: str = "sim",
        on_progress: Callable[[int], None] | None = None,
        autoscaling: SimAutoscaling | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.name = name
        self._on_progress = on_progress
        self.autoscaling = autoscaling

    def run_steps(self, steps: Sequence[Sequence[TrajectoryPlan]]) -> SimResult:
        """Synchronous RL: the trajectories of step k+1 start when all of step k are done."""
        return self._run(steps=steps, trace=())

    def run_trace(self, trace: Sequence[tuple[float, SimAction]]) -> SimResult:
        """Open loop: each ``(arrival_time, action)`` arrives at its time, whatever happens."""
        return self._run(steps=(), trace=trace)

    def _run(
        self,
        steps: Sequence[Sequence[TrajectoryPlan]],
        trace: Sequence[tuple[float, SimAction]],
    ) -> SimResult:
        t_wall = time.perf_counter()
        sched = self.scheduler
        res = SimResult(name=self.name, capacity=sched.capacity())
        heap: list[tuple[float, int, int, Any, int]] = []  # (time, seq, event, payload, version)
        counter = itertools.count()
        # Open-loop arrivals stay out of the heap: a sorted list read in order keeps the heap
        # as small as the running set (a million arrivals in it cost a fifth of the run). At one
        # instant, arrivals come before every other event, as if pushed first.
        arrivals = sorted(trace, key=lambda item: item[0])
        n_arrivals, next_arrival = len(arrivals), 0
        # Open loop: a trajectory ends when the last of its actions in the trace ends. Telling
        # the scheduler lets trajectory-bound provisioning (the static lease baseline) give its
        # sandbox back; without it, a static run with fewer sandboxes than trajectories would
        # leave every later trajectory's actions unstarted forever.
        left_in_traj: dict[str, int] = {}
        if sched.holds_trajectories:
            for _, action in arrivals:
                owner_key = action.spec.trajectory_id or action.spec.id
                left_in_traj[owner_key] = left_in_traj.get(owner_key, 0) + 1

        def push_finish(t: float, action_id: str, version: int) -> None:
            heapq.heappush(heap, (t, next(counter), _FINISH, action_id, version))

        pools = None
        if self.autoscaling is not None:
            pools = PoolTracker(self.autoscaling, sched, 0.0)
            heapq.heappush(heap, (0.0, next(counter), _SCALE, None, 0))
        runner = ActionRunner(sched, res, push_finish)
        owner: dict[str, int] = {}  # action id -> trajectory slot
        traj_turn: list[int] = []
        traj_pending: list[int] = []
        traj_plan: list[TrajectoryPlan] = []
        step_idx, step_start, live = -1, 0.0, 0
        now = 0.0

        def start_step(t: float) -> None:
            nonlocal step_idx, step_start, live
            step_idx += 1
            step_start = t
            traj_plan.clear()
            traj_turn.clear()
            traj_pending.clear()
            for slot, plan in enumerate(steps[step_idx]):
                traj_plan.append(plan)
                traj_turn.append(0)
                traj_pending.append(0)
                first = plan.turns[0].gen_s if plan.turns else 0.0
                heapq.heappush(heap, (t + first, next(counter), _TURN, slot, 0))
            live = len(steps[step_idx])

        if steps:
            start_step(0.0)
        done = 0
        last_work = 0.0  # time of the last event that was not a sizing decision
        while heap or next_arrival < n_arrivals:
            now = heap[0][0] if heap else math.inf
            if next_arrival < n_arrivals and arrivals[next_arrival][0] <= now:
                now = arrivals[next_arrival][0]
                while next_arrival < n_arrivals and arrivals[next_arrival][0] == now:
                    runner.submit(arrivals[next_arrival][1], now)
                    next_arrival += 1
                last_work = now
            while heap and heap[0][0] == now:
                _, _, kind, a, version = heapq.heappop(heap)
                if kind >= _SCALE:
                    assert pools is not None  # only an autoscaled run has these events
                    if kind == _READY:
                        pools.arrive(a[0], a[1], now)
                        continue
                    if not (heap or runner.waiting or runner.running or next_arrival < n_arrivals):
                        continue  # the run is over: stop deciding (and paying)
                    for t, resource, units in pools.decide(now):
                        heapq.heappush(heap, (t, next(counter), _READY, (resource, units), 0))
                    t = now + pools.spec.period_s
                    heapq.heappush(heap, (t, next(counter), _SCALE, None, 0))
                    continue
                last_work = now
                if kind == _FINISH:
                    if not runner.finish(a, version, now):
                        continue  # re-timed by a resize; a newer event exists
                    done += 1
                    if self._on_progress is not None and done % 10_000 == 0:
                        self._on_progress(done)
                    slot = owner.pop(a, -1)
                    spec = runner.last_spec
                    if slot < 0 and left_in_traj and spec is not None:
                        owner_key = spec.trajectory_id or spec.id
                        left = left_in_traj[owner_key] - 1
                        if left:
                            left_in_traj[owner_key] = left
                        else:
                            del left_in_traj[owner_key]
                            sched.trajectory_done(owner_key, now)
                    elif slot >= 0:
                        traj_pending[slot] -= 1
                        if traj_pending[slot] == 0:
                            traj_turn[slot] += 1
                            turns = traj_plan[slot].turns
                            nxt = (
                                turns[traj_turn[slot]].gen_s if traj_turn[slot] < len(turns) else 0
                            )
                            heapq.heappush(heap, (now + nxt, next(counter), _TURN, slot, 0))
                elif kind == _TURN:
                    slot = a
                    turns = traj_plan[slot].turns
                    k = traj_turn[slot]
                    if k >= len(turns):
                        sched.trajectory_done(traj_plan[slot].id, now)
                        live -= 1
                        if live == 0:
                            res.step_durations.append(now - step_start)
                            if step_idx + 1 < len(steps):
                                start_step(now)
                        continue
                    actions = turns[k].actions
                    if not actions:
                        traj_turn[slot] += 1
                        nxt = turns[k + 1].gen_s if k + 1 < len(turns) else 0.0
                        heapq.heappush(heap, (now + nxt, next(counter), _TURN, slot, 0))
                        continue
                    traj_pending[slot] = len(actions)
                    for action in actions:
                        owner[action.spec.id] = slot
                        runner.submit(action, now)
            runner.plan(now)
        if runner.waiting or runner.running:
            raise RuntimeError(
                f"simulation ended with {len(runner.waiting)} actions never started and "
                f"{len(runner.running)} never finished: the scheduler lost them"
            )
        res.makespan = last_work if pools is not None else now
        if pools is not None:
            pools.account(res.makespan)
            res.provisioned = dict(pools.provisioned)
        res.busy_unit_seconds = runner.busy
        res.wall_seconds = time.perf_counter() - t_wall
        res.schedule_calls = getattr(getattr(sched, "stats", None), "schedule_calls", 0)
        return res
