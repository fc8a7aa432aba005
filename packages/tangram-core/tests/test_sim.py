"""The simulator re-times actions correctly and drives any scheduler; baselines act as defined."""

from __future__ import annotations

import json

import pytest

from tangram_core.autoscaling import AutoscalingConfig
from tangram_core.baselines import StaticLeaseScheduler, isolated_per_kind
from tangram_core.elastic_scheduler import ElasticConfig, ElasticScheduler
from tangram_core.scheduler import EMPTY_PLAN, ActionSpec
from tangram_core.sim import (
    CodeAgentWorkload,
    PoolScaling,
    SimAction,
    SimAutoscaling,
    Simulator,
    TraceRecord,
    TrajectoryPlan,
    Turn,
    code_agent_steps,
    count_actions,
    load_trace,
    save_trace,
    summarize,
)

pytestmark = pytest.mark.usefixtures("no_ray")


def act(
    id: str,
    t1: float,
    *,
    traj: str | None = None,
    max_units: int = 1,
    p: float = 1.0,
    kind: str = "sandbox.run",
    demand: tuple = (("cpu", 1.0),),
) -> SimAction:
    factors = tuple((1 - p) + p / u for u in range(1, max_units + 1))
    spec = ActionSpec(
        id=id,
        kind=kind,
        demand=demand,
        max_units=max_units,
        factors=factors,
        estimated_t1=t1,
        trajectory_id=traj,
    )
    return SimAction(spec, t1)


def elastic(cap: float, **config) -> ElasticScheduler:
    return ElasticScheduler({"cpu": cap}, config=ElasticConfig(expand_reserve=0.0, **config))


def test_closed_loop_trajectory_timeline():
    plan = TrajectoryPlan(
        "t",
        (Turn(1.0, (act("a", 2.0, traj="t"),)), Turn(1.0, (act("b", 3.0, traj="t"),)), Turn(0.5)),
    )
    r = Simulator(elastic(1)).run_steps([[plan]])
    assert r.submit == [1.0, 4.0]
    assert r.end == [3.0, 7.0]
    assert r.step_durations == [7.5]
    assert r.makespan == 7.5


def test_steps_are_synchronous():
    slow = TrajectoryPlan("slow", (Turn(5.0, (act("a", 1.0, traj="slow"),)),))
    fast = TrajectoryPlan("fast", (Turn(1.0, (act("b", 1.0, traj="fast"),)),))
    nxt = TrajectoryPlan("next", (Turn(1.0, (act("c", 1.0, traj="next"),)),))
    r = Simulator(elastic(2)).run_steps([[slow, fast], [nxt]])
    assert r.step_durations == [6.0, 2.0]
    assert r.submit[-1] == 7.0  # step 2 starts only when the slow trajectory of step 1 ends


def test_elastic_action_runs_faster_on_more_units():
    r = Simulator(elastic(4)).run_trace([(0.0, act("e", 8.0, max_units=4))])
    assert r.end == [2.0]


def test_resize_retimes_the_running_action():
    # Alone, "e" takes all 4 cores and does 4 of its 8 single-core seconds by t=1. Then a rigid
    # action reclaims one core until t=2 (3 more done on 3 cores), after which "e" grows back to
    # 4 cores for its last second of work: 0.25 s.
    trace = [(0.0, act("e", 8.0, max_units=4)), (1.0, act("r", 1.0))]
    r = Simulator(elastic(4)).run_trace(trace)
    assert r.start[1] == 1.0
    assert r.end[1] == 2.0
    assert r.end[0] == pytest.approx(2.25)


def test_static_lease_holds_the_sandbox_through_generation():
    t1 = TrajectoryPlan("t1", (Turn(0.0, (act("a", 1.0, traj="t1"),)), Turn(10.0)))
    t2 = TrajectoryPlan("t2", (Turn(0.0, (act("b", 1.0, traj="t2"),)),))
    sched = StaticLeaseScheduler(1, {"cpu": 1.0}, fleets={})
    r = Simulator(sched).run_steps([[t1, t2]])
    assert r.start == [0.0, 11.0]  # t2 waits for t1 to finish generating, not just computing
    shared = Simulator(elastic(1)).run_steps([[t1, t2]])
    assert shared.start == [0.0, 1.0]


def test_isolated_pools_do_not_lend():
    trace = [
        (0.0, act("x1", 4.0, kind="k1")),
        (0.0, act("x2", 4.0, kind="k1")),
        (0.0, act("y", 1.0, kind="k2")),
    ]
    r = Simulator(isolated_per_kind({"k1": {"cpu": 1.0}, "k2": {"cpu": 1.0}})).run_trace(trace)
    assert r.end == [4.0, 8.0, 1.0]  # k2's idle core never helps k1


def test_simulator_refuses_a_scheduler_that_loses_actions():
    class Forgetful(ElasticScheduler):
        def schedule(self, now):
            return EMPTY_PLAN

    with pytest.raises(RuntimeError, match="1 actions never started"):
        Simulator(Forgetful({"cpu": 1})).run_trace([(0.0, act("lost", 1.0))])


def test_workload_is_reproducible_and_tangram_beats_static():
    w = CodeAgentWorkload(trajectories_per_step=32, steps=2)
    steps = code_agent_steps(w)
    assert count_actions(steps) == count_actions(code_agent_steps(w))
    fleets = {m: {"gpu": 2.0} for m in w.reward_models}
    static = Simulator(StaticLeaseScheduler(16, {"cpu": 1.0}, fleets)).run_steps(steps)
    ours = Simulator(ElasticScheduler({"cpu": 16.0, "gpu": 8.0})).run_steps(steps)
    again = Simulator(ElasticScheduler({"cpu": 16.0, "gpu": 8.0})).run_steps(steps)
    assert ours.end == again.end  # deterministic
    assert ours.n_actions == static.n_actions == count_actions(steps)
    assert summarize(ours.acts())["mean"] < summarize(static.acts())["mean"]
    for u in ours.utilisation().values():
        assert 0.0 < u <= 1.0


def test_trace_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "trace.jsonl"
    records = [
        TraceRecord(id="a", kind="sandbox.run", arrival_s=0.5, duration_s=1.0),
        TraceRecord(
            id="b", kind="reward.rm", arrival_s=0.1, duration_s=2.0, demand={"gpu": 1}, max_units=2
        ),
    ]
    assert save_trace(records, path) == 2
    trace = load_trace(path)
    assert [a.spec.id for _, a in trace] == ["b", "a"]  # sorted by arrival
    r = Simulator(ElasticScheduler({"cpu": 1, "gpu": 1})).run_trace(trace)
    assert r.n_actions == 2
    with open(path, "a") as fh:
        fh.write(json.dumps({"id": "c", "kind": "x", "arrival_s": 1, "duration_s": -1}) + "\n")
    with pytest.raises(ValueError, match=r"(?s)trace.jsonl:3: invalid trace record.*duration_s"):
        load_trace(path)


def test_summarize_quantiles():
    s = summarize([float(i) for i in range(1, 101)])
    assert (s["n"], s["mean"], s["p50"], s["p99"]) == (100, 50.5, 51.0, 100.0)
    assert summarize([])["n"] == 0


def test_autoscaled_pool_warms_up_for_a_burst_then_shrinks_damped_and_is_paid_for():
    """The runtime's policy on the virtual clock, checked by hand. Ten 4 s actions at t=0 on a
    1-unit pool: the policy asks for 9 more, ready at t=2 (warm-up), so one action ends at 4 and
    nine at 6. Then the pool shrinks by half every 10 s (10, 5, 3, 2, 1) from t=14, after the
    10 s delay counted from t=4, down to min_units. A lone action at t=100 runs on the last unit.
    Paid: 10 units from 0 to 14 (warming ones included), 5 to 24, 3 to 34, 2 to 44, then 1."""
    trace = [(0.0, act(f"a{i}", 4.0)) for i in range(10)] + [(100.0, act("late", 1.0))]
    scaling = SimAutoscaling(
        pools={
            "cpu": PoolScaling(
                config=AutoscalingConfig(
                    min_units=1,
                    max_units=10,
                    target_utilisation=1.0,
                    downscale_delay_s=10.0,
                    downscale_step=0.5,
                ),
                warmup_s=2.0,
            )
        },
        period_s=1.0,
    )
    r = Simulator(elastic(1), autoscaling=scaling).run_trace(trace)
    assert sorted(r.acts()) == [1.0, 4.0] + [6.0] * 9
    assert r.makespan == 101.0
    assert r.provisioned == {"cpu": pytest.approx(10 * 14 + 5 * 10 + 3 * 10 + 2 * 10 + 57)}
    assert r.resource_seconds() == r.provisioned
    assert r.utilisation()["cpu"] == pytest.approx((4 + 9 * 4 + 1) / 297)


def test_autoscaling_an_unknown_resource_is_refused():
    scaling = SimAutoscaling(pools={"gpu": PoolScaling(config=AutoscalingConfig(max_units=2))})
    with pytest.raises(ValueError, match=r"autoscaled resources \['gpu'\] are not in"):
        Simulator(elastic(1), autoscaling=scaling).run_trace([(0.0, act("a", 1.0))])


def test_open_loop_static_returns_a_lease_when_the_trajectory_last_action_ends():
    # 12 trajectories of 3 actions each on 2 sandboxes: leases must come back, or 10
    # trajectories would never start.
    trace = [
        (float(t) + 0.5 * k, act(f"t{t}a{k}", 1.0, traj=f"t{t}"))
        for t in range(12)
        for k in range(3)
    ]
    static = Simulator(StaticLeaseScheduler(2, {"cpu": 1.0}, fleets={})).run_trace(trace)
    assert static.n_actions == 36
    # A trajectory holds its sandbox until its last action ends: never more than 2 at once.
    spans: dict[str, tuple[float, float]] = {}
    for spec_id, s, e in zip(
        (a.spec.id for a in static.actions), static.start, static.end, strict=True
    ):
        traj = spec_id.split("a")[0]
        lo, hi = spans.get(traj, (s, e))
        spans[traj] = (min(lo, s), max(hi, e))
    for t in {s for s, _ in spans.values()}:
        assert sum(lo <= t < hi for lo, hi in spans.values()) <= 2
    # Actions with no trajectory each lease for themselves and give it back at their end.
    solo = [(0.0, act(f"s{i}", 1.0)) for i in range(5)]
    res = Simulator(StaticLeaseScheduler(1, {"cpu": 1.0}, fleets={})).run_trace(solo)
    assert sorted(res.end) == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
