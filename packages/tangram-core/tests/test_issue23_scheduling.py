"""Issue 23: EASY reservations for multi-unit actions, least-attained-service order, payload-aware
and caller estimates, and rigid multi-GPU reward workloads."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from tangram_core.actions import Action
from tangram_core.elastic_scheduler import ElasticConfig, ElasticScheduler
from tangram_core.estimator import DurationEstimator
from tangram_core.payload_estimator import PayloadEstimator
from tangram_core.scheduler import ActionSpec
from tangram_core.sim import CodeAgentWorkload, SimAction, Simulator, code_agent_steps

pytestmark = pytest.mark.usefixtures("no_ray")


def gpu_spec(id: str, est: float, gpus: float = 1.0, traj: str | None = None) -> ActionSpec:
    return ActionSpec(
        id=id, kind=f"g{gpus:g}", demand=(("gpu", gpus),), estimated_t1=est, trajectory_id=traj
    )


def make_scheduler(cap: float = 4.0, **config) -> ElasticScheduler:
    config.setdefault("expand", False)
    return ElasticScheduler({"gpu": cap}, config=ElasticConfig(**config))


def started(sched: ElasticScheduler, now: float) -> set[str]:
    return {s.action_id for s in sched.schedule(now).starts}


# -- EASY reservations ---------------------------------------------------------------------------


def test_reservation_backfills_only_what_ends_before_the_reserved_start():
    sched = make_scheduler(reserve_after_s=0.0)
    for i in range(3):
        sched.submit(gpu_spec(f"run{i}", 5.0), 0.0)
    assert started(sched, 0.0) == {"run0", "run1", "run2"}  # one GPU left free
    sched.submit(gpu_spec("big", 1.0, gpus=4.0), 0.0)  # first in rank order, does not fit
    sched.submit(gpu_spec("short", 2.0), 0.0)  # ends at 2 s, before big's start at 5 s
    sched.submit(gpu_spec("long", 10.0), 0.0)  # would hold a GPU past 5 s
    assert started(sched, 0.0) == {"short"}
    sched.complete("short", 2.0)
    assert started(sched, 2.0) == set()  # the freed GPU waits for big, not for long
    for i in range(3):
        sched.complete(f"run{i}", 5.0)
    assert started(sched, 5.0) == {"big"}


def test_without_reservation_small_actions_take_the_units_first():
    sched = make_scheduler(reserve=False)
    for i in range(3):
        sched.submit(gpu_spec(f"run{i}", 5.0), 0.0)
    started(sched, 0.0)
    sched.submit(gpu_spec("big", 1.0, gpus=4.0), 0.0)
    sched.submit(gpu_spec("long", 10.0), 0.0)
    assert started(sched, 0.0) == {"long"}


def test_reservation_waits_for_reserve_after_s():
    sched = make_scheduler(reserve_after_s=3.0)
    for i in range(3):
        sched.submit(gpu_spec(f"run{i}", 5.0), 0.0)
    started(sched, 0.0)
    sched.submit(gpu_spec("big", 1.0, gpus=4.0), 0.0)
    sched.submit(gpu_spec("long", 10.0), 0.0)
    assert started(sched, 0.0) == {"long"}  # big has not waited 3 s yet: no reservation
    sched.submit(gpu_spec("long2", 10.0), 3.5)
    sched.complete("run0", 3.5)
    assert started(sched, 3.5) == set()  # now it has: the freed GPU is held for big


def stream_with_one_big(seed: int = 1) -> list[tuple[float, SimAction]]:
    """One-GPU calls keep 4 GPUs ~95% busy; one rigid 4-GPU call arrives at t = 5 s."""
    rng = random.Random(seed)
    trace, t = [], 0.0
    for i in range(300):
        t += rng.expovariate(1.9)
        d = rng.uniform(1.5, 2.5)
        trace.append((t, SimAction(gpu_spec(f"s{i}", d), d)))
    trace.append((5.0, SimAction(gpu_spec("big", 1.0, gpus=4.0), 1.0)))
    return trace


@pytest.mark.parametrize("reserve", [True, False])
def test_a_stream_of_small_actions_cannot_postpone_a_large_one(reserve):
    sched = make_scheduler(reserve=reserve, reserve_after_s=0.0, max_wait_s=60.0)
    trace = stream_with_one_big()
    res = Simulator(sched).run_trace(trace)
    i = next(k for k, a in enumerate(res.actions) if a.spec.id == "big")
    wait = res.start[i] - res.submit[i]
    if reserve:
        assert wait < 3.0  # as soon as the running ones end, by estimate
    else:
        assert wait > 10.0  # starved until its resources happen to be free together


def test_reservation_tracks_ends_of_actions_started_before_the_first_multi_unit_shape():
    sched = make_scheduler(reserve_after_s=0.0)
    sched.submit(gpu_spec("early", 5.0), 0.0)
    started(sched, 0.0)  # no multi-unit shape yet: ends are not tracked
    sched.submit(gpu_spec("mid", 5.0), 1.0)
    sched.submit(gpu_spec("mid2", 5.0), 1.0)
    started(sched, 1.0)
    sched.submit(gpu_spec("big", 1.0, gpus=4.0), 1.0)
    sched.submit(gpu_spec("long", 10.0), 1.0)
    assert started(sched, 1.0) == set()  # reserved at 6 s (mid's end), long would overrun


# -- least attained service ----------------------------------------------------------------------


@pytest.mark.parametrize(("order", "first"), [("las", "q"), ("srpt", "p")])
def test_las_runs_the_trajectory_with_least_service_first(order, first):
    sched = make_scheduler(cap=1.0, order=order, aging_rate=0.0)
    sched.submit(gpu_spec("x", 5.0, traj="T1"), 0.0)
    started(sched, 0.0)
    sched.complete("x", 5.0)  # T1 has had 5 s of service
    sched.submit(gpu_spec("blocker", 1.0, traj="T3"), 5.0)
    started(sched, 5.0)
    sched.submit(gpu_spec("p", 0.1, traj="T1"), 5.0)  # shortest, but T1 was served already
    sched.submit(gpu_spec("q", 3.0, traj="T2"), 5.0)
    sched.complete("blocker", 6.0)
    assert started(sched, 6.0) == {first}


# -- estimates -----------------------------------------------------------------------------------


def feature_spec(i: int, tests: int, kind: str = "sandbox.run_tests", est=None) -> ActionSpec:
    return ActionSpec(
        id=f"f{i}",
        kind=kind,
        demand=(("cpu", 1.0),),
        features=(("tests", float(tests)),),
        estimated_t1=est,
    )


def test_payload_estimator_learns_durations_from_features_and_falls_back_before():
    rng = random.Random(0)
    est = PayloadEstimator(min_observations=12)
    for i in range(11):
        tests = rng.randint(5, 200)
        est.observe_spec(feature_spec(i, tests), 0.05 * tests * math.exp(rng.gauss(0, 0.1)))
    # Too few observations: the per-kind mean answers, whatever the features say.
    assert est.own_estimate(feature_spec(0, 1)) == est.own_estimate(feature_spec(0, 200))
    for i in range(11, 300):
        tests = rng.randint(5, 200)
        est.observe_spec(feature_spec(i, tests), 0.05 * tests * math.exp(rng.gauss(0, 0.1)))
    assert est.own_estimate(feature_spec(0, 5)) == pytest.approx(0.25, rel=0.25)
    assert est.own_estimate(feature_spec(0, 200)) == pytest.approx(10.0, rel=0.25)
    acc = est.accuracy()["sandbox.run_tests"]
    assert acc.count == 300
    per_kind = DurationEstimator()
    rng = random.Random(0)
    for i in range(300):
        tests = rng.randint(5, 200)
        per_kind.observe_spec(feature_spec(i, tests), 0.05 * tests * math.exp(rng.gauss(0, 0.1)))
    assert acc.mape < 0.5 * per_kind.accuracy()["sandbox.run_tests"].mape


def test_scheduler_uses_the_better_of_caller_and_own_estimate():
    rng = random.Random(1)
    for caller_factor, uses_own in ((10.0, True), (1.0, False)):
        est = PayloadEstimator()
        for i in range(60):
            tests = rng.randint(1, 50)
            t1 = 0.1 * tests * math.exp(rng.gauss(0, 0.3))
            est.observe_spec(feature_spec(i, tests, est=caller_factor * t1), t1)
        spec = feature_spec(999, 10, est=123.0)
        chosen = est.estimate_spec(spec)
        assert (chosen != 123.0) is uses_own
        assert est.caller_comparison()["sandbox.run_tests"]["uses_own"] == float(uses_own)


def test_action_features_reach_the_spec_and_are_validated():
    action = Action(kind="sandbox.run_tests", features={"tests": 12, "code_bytes": 900})
    spec = ActionSpec.from_action(action)
    assert spec.features == (("code_bytes", 900.0), ("tests", 12.0))
    with pytest.raises(ValidationError, match="finite number >= 0"):
        Action(kind="x", features={"tests": -1})


# -- the rigid multi-GPU workload ----------------------------------------------------------------


def test_rigid_reward_workload_builds_multi_gpu_actions_and_features():
    w = CodeAgentWorkload(
        trajectories_per_step=8,
        steps=1,
        reward_models=("small", "large"),
        reward_gpus=(1, 4),
    )
    actions = [a for p in code_agent_steps(w)[0] for turn in p.turns for a in turn.actions]
    gpus = {a.spec.kind: a.spec.demand for a in actions if a.spec.kind in ("small", "large")}
    assert set(gpus.values()) <= {(("gpu", 1.0),), (("gpu", 4.0),)}
    assert all(a.spec.max_units == 1 for a in actions if a.spec.kind in ("small", "large"))
    code = [a for a in actions if a.spec.kind.startswith("sandbox")]
    assert all(dict(a.spec.features)["code_bytes"] > 0 for a in code)
    # Features come from their own generator: durations are the same with them off.
    plain = CodeAgentWorkload(**{**w.model_dump(), "feature_corr": 0.0})
    again = [a for p in code_agent_steps(plain)[0] for turn in p.turns for a in turn.actions]
    assert [a.true_t1 for a in again] == [a.true_t1 for a in actions]
    with pytest.raises(ValidationError, match="one GPU count per reward model"):
        CodeAgentWorkload(reward_models=("a", "b"), reward_gpus=(1,))


def test_a_reservation_that_can_never_be_met_holds_nothing_back():
    # The pool can grow to 8 GPUs but holds 4 now: a 6-GPU action waits for the autoscaler,
    # and its reservation must not idle the 4 GPUs meanwhile.
    sched = ElasticScheduler(
        {"gpu": 4.0},
        limits={"gpu": 8.0},
        config=ElasticConfig(expand=False, reserve_after_s=0.0),
    )
    sched.submit(gpu_spec("run", 5.0), 0.0)
    started(sched, 0.0)
    sched.submit(gpu_spec("huge", 1.0, gpus=6.0), 0.0)
    sched.submit(gpu_spec("long", 10.0), 0.0)
    assert started(sched, 0.0) == {"long"}
    sched.set_capacity({"gpu": 8.0}, {"gpu": 8.0})
    sched.complete("run", 5.0)
    assert started(sched, 5.0) == {"huge"}
