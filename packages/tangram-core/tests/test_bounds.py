"""The capacity bound is a true lower bound: checked against brute-force optima and real runs."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tangram_core.baselines import PartitionedFifoScheduler
from tangram_core.elastic_scheduler import ElasticConfig, ElasticScheduler
from tangram_core.scheduler import ActionSpec, Scheduler
from tangram_core.sim import CodeAgentWorkload, SimAction, Simulator, code_agent_steps
from tangram_core.sim.bounds import (
    Job,
    ListSchedule,
    best_list_schedule,
    capacity_bound,
    list_schedule,
    mean_busy_sum,
    result_jobs,
    srpt_flow_sum,
    trace_jobs,
)

pytestmark = pytest.mark.usefixtures("no_ray")


def job(i: int, arrival: float, t1: float, gpus: float = 1.0, max_units: int = 1) -> Job:
    factors = tuple(0.2 + 0.8 / u for u in range(1, max_units + 1))
    spec = ActionSpec(
        id=f"j{i}", kind="k", demand=(("gpu", gpus),), max_units=max_units, factors=factors
    )
    return Job(arrival, spec, t1)


def brute_force_optimum(jobs: list[Job], cap: float) -> float:
    """Least mean ACT over every non-preemptive schedule (units fixed at start), found by
    trying every set of startable actions at every event time. Starting only at events loses
    nothing for a sum of completion times (any start can slide left to the previous event)."""
    best = math.inf

    def options(j: Job) -> list[tuple[int, float, float]]:
        s, d = j.spec, j.spec.demand[0][1]
        return [(u, d * u, j.true_t1 * s.factor(u)) for u in range(s.min_units, s.max_units + 1)]

    def search(t: float, running: list[tuple[float, float]], pending: list[int], acc: float):
        nonlocal best
        if acc >= best:
            return
        if not pending:
            best = min(best, acc)
            return
        used = sum(u for _, u in running)
        ready = [i for i in pending if jobs[i].arrival <= t + 1e-12]
        choices: list[list[tuple[int, int, float, float]]] = [[]]
        for r in range(1, len(ready) + 1):
            for subset in itertools.combinations(ready, r):
                for picks in itertools.product(*(options(jobs[i]) for i in subset)):
                    if used + sum(p[1] for p in picks) <= cap + 1e-9:
                        choices.append(
                            [(i, *p) for i, p in zip(subset, picks, strict=True)]  # type: ignore[misc]
                        )
        for choice in choices:
            run = running + [(t + dur, area) for _, _, area, dur in choice]
            left = [i for i in pending if i not in {c[0] for c in choice}]
            gained = sum(t + dur - jobs[i].arrival for i, _, _, dur in choice)
            events = [e for e, _ in run if e > t] + [jobs[i].arrival for i in left]
            events = [e for e in events if e > t]
            if left and not events:
                continue  # nothing will ever change: a dead end
            if not left:
                search(t, run, left, acc + gained)
                continue
            nxt = min(events)
            search(nxt, [(e, u) for e, u in run if e > nxt + 1e-12], left, acc + gained)

    search(min(j.arrival for j in jobs), [], list(range(len(jobs))), 0.0)
    return best / len(jobs)


def test_srpt_flow_sum_preempts_for_a_shorter_arrival():
    # Work 4 from t=0, work 1 arrives at t=1: SRPT runs the short one at once.
    assert srpt_flow_sum([(0.0, 4.0), (1.0, 1.0)]) == pytest.approx(5.0 + 1.0)


def test_bound_is_exact_where_shortest_first_is_optimal():
    # One unit, everything at t=0, rigid: shortest first is optimal and the bound equals it.
    jobs = [job(i, 0.0, t) for i, t in enumerate([3.0, 1.0, 2.0])]
    bound = capacity_bound(jobs, {"gpu": 1.0})
    assert bound.mean == pytest.approx(brute_force_optimum(jobs, 1.0)) == pytest.approx(10 / 3)
    assert bound.binding == "gpu"
    assert bound.no_queueing_mean == pytest.approx(2.0)


def small_instance(rng: random.Random) -> tuple[float, list]:
    """Four small GPU jobs on 2-4 GPUs, few enough to enumerate every schedule."""
    cap = float(rng.choice([2, 3, 4]))
    jobs = [
        job(
            i,
            float(rng.randint(0, 3)),
            float(rng.randint(1, 5)),
            gpus=float(rng.choice([1, 1, 2])),
            max_units=rng.choice([1, 1, 2]),
        )
        for i in range(4)
    ]
    jobs = [j for j in jobs if j.spec.demand[0][1] * j.spec.min_units <= cap]
    return cap, jobs


@pytest.mark.parametrize("seed", range(30))
def test_bound_never_exceeds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    cap, jobs = small_instance(rng)
    bound = capacity_bound(jobs, {"gpu": cap})
    optimum = brute_force_optimum(jobs, cap)
    assert bound.no_queueing_mean <= bound.mean <= optimum + 1e-9


def test_bound_counts_capacity_where_no_queueing_does_not():
    # 20 one-unit actions of 1 s at once on 2 units: no schedule averages below 5.5 s.
    jobs = [job(i, 0.0, 1.0) for i in range(20)]
    bound = capacity_bound(jobs, {"gpu": 2.0})
    assert bound.no_queueing_mean == pytest.approx(1.0)
    optimum = sum(math.ceil((i + 1) / 2) for i in range(20)) / 20  # pairs end at 1, 2, ... 10 s
    # SRPT on the pooled machine (speed 2, 0.5 s each) gives 5.25 s; the mean-busy-time bound
    # knows that each action spans 1 s, and reaches the optimum: 5.0 + 0.5.
    assert srpt_flow_sum([(0.0, 0.5)] * 20) / 20 == pytest.approx(5.25)
    assert mean_busy_sum([(0.0, 0.5, 1.0)] * 20) / 20 == pytest.approx(5.5)
    assert bound.mean == pytest.approx(optimum) == pytest.approx(5.5)


def test_bound_is_below_real_runs_and_result_jobs_match_the_trace():
    rng = random.Random(4)
    trace = []
    for i in range(300):
        units = rng.choice([1, 2, 4])
        spec = ActionSpec(
            id=f"a{i}",
            kind=f"g{units}",
            demand=(("gpu", float(units)),),
            estimated_t1=1.0,
        )
        trace.append((rng.uniform(0, 60), SimAction(spec, rng.uniform(0.5, 3.0))))
    result = Simulator(ElasticScheduler({"gpu": 8.0})).run_trace(trace)
    from_run = capacity_bound(result_jobs(result), {"gpu": 8.0})
    from_trace = capacity_bound(trace_jobs(trace), {"gpu": 8.0})
    assert from_run.mean == pytest.approx(from_trace.mean)
    mean_act = sum(result.acts()) / result.n_actions
    assert from_trace.no_queueing_mean < from_trace.mean <= mean_act


# -- the other side: feasible schedules ----------------------------------------------------------


def assert_feasible(jobs: list[Job], sched: ListSchedule, cap: dict[str, float]) -> None:
    """Every job starts after it arrives, runs its true duration on its units, and at every
    start no pool holds more than its capacity."""
    for j, s, e, u in zip(jobs, sched.start, sched.end, sched.units, strict=True):
        assert s >= j.arrival - 1e-12
        assert e == pytest.approx(s + j.true_t1 * j.spec.factor(u))
        assert j.spec.min_units <= u <= j.spec.max_units
    for t in sched.start:
        for r, c in cap.items():
            held = sum(
                dict(j.spec.demand).get(r, 0.0) * u
                for j, s, e, u in zip(jobs, sched.start, sched.end, sched.units, strict=True)
                if s <= t < e
            )
            assert held <= c + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_list_schedules_are_feasible_and_never_beat_the_brute_force_optimum(seed):
    rng = random.Random(100 + seed)
    cap, jobs = small_instance(rng)
    optimum = brute_force_optimum(jobs, cap)
    bound = capacity_bound(jobs, {"gpu": cap})
    for order in ("shortest", "area", "fifo"):
        for fastest in (True, False):
            sched = list_schedule(jobs, {"gpu": cap}, order, fastest=fastest)
            assert_feasible(jobs, sched, {"gpu": cap})
            assert bound.mean <= optimum + 1e-9 <= sched.mean + 2e-9


def rigid_mix(seed: int, n: int = 80, span: float = 20.0) -> list[Job]:
    """Rigid 1-, 2- and 4-GPU jobs and elastic one-core-to-eight jobs, arriving in a burst."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        arrival = rng.uniform(0, span) if rng.random() < 0.5 else rng.uniform(0, 2)
        if rng.random() < 0.6:
            g = float(rng.choice([1, 2, 4]))
            spec = ActionSpec(id=f"g{i}", kind=f"g{g:g}", demand=(("gpu", g),))
        else:
            factors = tuple(0.1 + 0.9 / u for u in range(1, 9))
            spec = ActionSpec(
                id=f"c{i}", kind="cpu", demand=(("cpu", 1.0),), max_units=8, factors=factors
            )
        out.append(Job(arrival, spec, rng.uniform(0.5, 3.0)))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_bound_never_exceeds_a_feasible_schedule_of_rigid_multi_unit_mixes(seed):
    cap = {"gpu": float(random.Random(seed).choice([4, 6, 14])), "cpu": 8.0}
    jobs = rigid_mix(seed)
    bound = capacity_bound(jobs, cap)
    best = best_list_schedule(jobs, cap)
    assert_feasible(jobs, best, cap)
    assert bound.no_queueing_mean <= bound.mean <= best.mean + 1e-9
    assert best.mean == min(
        list_schedule(jobs, cap, o, fastest=f).mean
        for o in ("shortest", "area", "fifo")
        for f in (True, False)
    )


def rigid_schedulers(cap: dict[str, float]) -> dict[str, Scheduler]:
    return {
        "tangram": ElasticScheduler(cap),
        "las": ElasticScheduler(cap, config=ElasticConfig(order="las")),
        "no_reservation": ElasticScheduler(cap, config=ElasticConfig(reserve=False)),
        "reserve_at_once": ElasticScheduler(cap, config=ElasticConfig(reserve_after_s=0.0)),
        "fifo": PartitionedFifoScheduler(
            {"cpu": {"cpu": cap["cpu"]}, "gpu": {"gpu": cap["gpu"]}},
            lambda spec: "gpu" if any(r == "gpu" for r, _ in spec.demand) else "cpu",
        ),
    }


def test_bound_is_below_every_scheduler_on_the_rigid_multi_gpu_workload():
    """Closed-loop RL steps with rigid 1/2/4-GPU reward calls on a loaded pool: at each run's
    own arrivals, the bound is below that run and below the clairvoyant list schedules."""
    w = CodeAgentWorkload(
        trajectories_per_step=96,
        steps=2,
        reward_models=("small", "medium", "large"),
        reward_gpus=(1, 2, 4),
    )
    steps = code_agent_steps(w)
    cap = {"cpu": 16.0, "gpu": 5.0}
    for name, sched in rigid_schedulers(cap).items():
        result = Simulator(sched, name=name).run_steps(steps)
        jobs = result_jobs(result)
        bound = capacity_bound(jobs, cap)
        mean_act = sum(result.acts()) / result.n_actions
        assert bound.binding == "gpu", name  # loaded: the capacity part does count
        assert bound.no_queueing_mean < bound.mean <= mean_act, name
        assert bound.mean <= best_list_schedule(jobs, cap).mean, name
