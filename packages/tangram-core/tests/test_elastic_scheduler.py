"""The elastic scheduler's decisions, one behaviour per test. Pure logic: Ray must not start."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tangram_core.scheduler import EMPTY_PLAN, CapacityError, Resize, Start
from tangram_core.testing import make_scheduler, make_spec

pytestmark = pytest.mark.usefixtures("no_ray")


def started(plan) -> dict[str, int]:
    return {s.action_id: s.units for s in plan.starts}


def test_shortest_estimated_work_first():
    s = make_scheduler({"cpu": 1})
    s.submit(make_spec("long", est=10), now=0)
    s.submit(make_spec("short", est=1), now=0)
    assert started(s.schedule(0)) == {"short": 1}
    s.complete("short", now=1)
    assert started(s.schedule(1)) == {"long": 1}


def test_priority_beats_estimate():
    s = make_scheduler({"cpu": 1})
    s.submit(make_spec("short", est=1), now=0)
    s.submit(make_spec("urgent", est=50, priority=5), now=0)
    assert started(s.schedule(0)) == {"urgent": 1}


def test_backfills_past_a_head_that_does_not_fit():
    s = make_scheduler({"cpu": 3})
    s.submit(make_spec("running", est=100), now=0)
    assert started(s.schedule(0)) == {"running": 1}
    s.submit(make_spec("wide", est=1, demand={"cpu": 3}), now=1)
    s.submit(make_spec("narrow", est=5), now=1)
    plan = s.schedule(1)
    assert started(plan) == {"narrow": 1}  # wide ranks first but cannot fit: work-conserving
    assert s.queued == 1


def test_multi_resource_action_needs_all_at_once():
    s = make_scheduler({"cpu": 4, "gpu": 1})
    s.submit(make_spec("rm", kind="reward.rm", demand={"gpu": 1}, est=5), now=0)
    s.submit(make_spec("both", kind="judge", demand={"cpu": 1, "gpu": 1}, est=1), now=0)
    # "both" ranks first (shorter) and fits; "rm" then finds the GPU taken.
    assert started(s.schedule(0)) == {"both": 1}
    assert s.usage() == {"cpu": 1, "gpu": 1}
    s.complete("both", now=1)
    assert started(s.schedule(1)) == {"rm": 1}


def test_spare_units_go_to_elastic_actions():
    s = make_scheduler({"cpu": 8})
    s.submit(make_spec("tests", est=8, max_units=8, parallel_fraction=1.0), now=0)
    assert started(s.schedule(0)) == {"tests": 8}
    assert s.usage() == {"cpu": 8}


def test_expansion_favours_the_largest_marginal_gain():
    s = make_scheduler({"cpu": 6})
    s.submit(make_spec("big", est=100, max_units=8, parallel_fraction=1.0), now=0)
    s.submit(make_spec("small", est=1, max_units=8, parallel_fraction=1.0), now=0)
    units = started(s.schedule(0))
    assert sum(units.values()) == 6
    assert units["big"] > units["small"] >= 1


def test_queued_action_reclaims_borrowed_units():
    s = make_scheduler({"cpu": 4})
    s.submit(make_spec("elastic", est=40, max_units=4, parallel_fraction=1.0), now=0)
    assert started(s.schedule(0)) == {"elastic": 4}
    s.submit(make_spec("rigid", est=1), now=1)
    plan = s.schedule(1)
    assert plan.starts == (Start("rigid", 1),)
    assert plan.resizes == (Resize("elastic", 3),)
    assert s.usage() == {"cpu": 4}


def test_a_refused_shrink_puts_the_units_back_and_the_action_is_never_resized_again():
    s = make_scheduler({"cpu": 4})
    s.submit(make_spec("elastic", est=40, max_units=4, parallel_fraction=1.0), now=0)
    assert started(s.schedule(0)) == {"elastic": 4}
    s.submit(make_spec("rigid", est=1), now=1)
    assert s.schedule(1).resizes == (Resize("elastic", 3),)
    # The manager kept it on 4: the pool is overcommitted by the one unit "rigid" started on.
    s.resize_refused("elastic", 4, now=1.1)
    assert s.usage() == {"cpu": 5}
    assert s.stats.resizes_refused == 1
    s.submit(make_spec("next", est=1), now=2)
    assert s.schedule(2) == EMPTY_PLAN  # no reclaim from a fixed action, nothing fits
    s.complete("rigid", now=3)
    assert s.schedule(3) == EMPTY_PLAN  # 4 of 4 still held by "elastic"
    s.complete("elastic", now=4)
    assert started(s.schedule(4)) == {"next": 1}
    assert s.usage() == {"cpu": 1}


def test_a_refused_grow_frees_the_units_it_never_handed_over():
    s = make_scheduler({"cpu": 8}, expand_reserve=0.0)
    s.submit(make_spec("c", est=40), now=0)
    s.submit(make_spec("d", est=40, max_units=8, parallel_fraction=1.0), now=0)
    assert started(s.schedule(0)) == {"c": 1, "d": 7}
    s.complete("c", now=1)
    assert s.schedule(1).resizes == (Resize("d", 8),)
    s.resize_refused("d", 7, now=1.1)  # the grow never happened
    assert s.usage() == {"cpu": 7}
    assert s.schedule(2) == EMPTY_PLAN  # d is fixed: no second grow
    s.submit(make_spec("f", est=1), now=3)
    assert started(s.schedule(3)) == {"f": 1}
    assert s.usage() == {"cpu": 8}


def test_no_running_resizes_when_manager_cannot_resize():
    s = make_scheduler({"cpu": 4}, resize_running=False)
    s.submit(make_spec("first", est=10, max_units=4), now=0)
    assert started(s.schedule(0)) == {"first": 4}
    s.submit(make_spec("second", est=1), now=1)
    plan = s.schedule(1)
    assert plan == EMPTY_PLAN  # cannot take units back from a running action
    s.complete("first", now=5)
    s.submit(make_spec("third", est=10, max_units=4), now=5)
    plan = s.schedule(5)
    assert not plan.resizes
    assert set(started(plan)) == {"second", "third"}


def test_bounded_wait_under_a_stream_of_short_actions():
    max_wait = 20.0
    s = make_scheduler({"cpu": 1}, aging_rate=0.0, max_wait_s=max_wait)
    s.submit(make_spec("long", est=100), now=0)
    now, n, long_started = 0.0, 0, None
    s.submit(make_spec("s0", est=1), now=0)
    while long_started is None and now < 500:
        for action_id in started(s.schedule(now)):
            if action_id == "long":
                long_started = now
            running = action_id
        now += 1.0
        n += 1
        s.submit(make_spec(f"s{n}", est=1), now=now)  # always a shorter one waiting
        s.complete(running, now=now)
    assert long_started is not None
    assert long_started <= max_wait + 1.0


def test_pure_srpt_without_aging_would_starve():
    """The control for the test above: with no aging and no bound, the long action never runs."""
    s = make_scheduler({"cpu": 1}, aging_rate=0.0, max_wait_s=1e9)
    s.submit(make_spec("long", est=100), now=0)
    s.submit(make_spec("s0", est=1), now=0)
    for n in range(1, 200):
        (running,) = started(s.schedule(float(n - 1)))
        assert running != "long"
        s.submit(make_spec(f"s{n}", est=1), now=float(n))
        s.complete(running, now=float(n))
    assert s.queued == 2  # "long" and the newest short one


def test_capacity_errors_name_the_problem():
    s = make_scheduler({"cpu": 4})
    with pytest.raises(
        CapacityError, match=r"needs 8 cpu .* more than the pool can ever hold \(4\)"
    ):
        s.submit(make_spec("huge", demand={"cpu": 8}), now=0)
    with pytest.raises(CapacityError, match=r"resource 'tpu', which no pool provides"):
        s.submit(make_spec("alien", demand={"tpu": 1}), now=0)
    s.submit(make_spec("dup"), now=0)
    with pytest.raises(ValueError, match="submitted twice"):
        s.submit(make_spec("dup"), now=0)
    assert s.queued == 1  # only the first dup; the rejected ones left nothing behind


def test_limits_admit_actions_larger_than_current_capacity():
    s = make_scheduler({"cpu": 2})
    s.set_capacity({"cpu": 2}, limits={"cpu": 16})  # the pool can scale to 16
    s.submit(make_spec("wide", demand={"cpu": 8}), now=0)
    assert s.schedule(0) == EMPTY_PLAN
    s.set_capacity({"cpu": 8}, limits={"cpu": 16})
    assert started(s.schedule(1)) == {"wide": 1}


def test_cancel_only_queued_actions():
    s = make_scheduler({"cpu": 1})
    s.submit(make_spec("a", est=1), now=0)
    s.submit(make_spec("b", est=2), now=0)
    s.schedule(0)
    assert s.cancel("b") is True
    assert s.cancel("a") is False  # running
    assert s.cancel("nope") is False
    s.complete("a", now=1)
    assert s.schedule(1) == EMPTY_PLAN
    assert s.queued == 0


def test_requeue_keeps_its_place():
    s = make_scheduler({"cpu": 1})
    s.submit(make_spec("first", est=5), now=0)
    assert started(s.schedule(0)) == {"first": 1}
    s.submit(make_spec("later", est=5), now=3)
    s.requeue("first", now=4)  # its worker died
    assert started(s.schedule(4)) == {"first": 1}


def test_schedule_is_cheap_and_empty_when_nothing_changed():
    s = make_scheduler({"cpu": 1})
    s.submit(make_spec("a"), now=0)
    s.submit(make_spec("b"), now=0)
    assert s.schedule(0)
    assert s.schedule(0) == EMPTY_PLAN
    assert not EMPTY_PLAN


def test_estimator_learns_from_completions():
    s = make_scheduler({"cpu": 1})
    for i in range(20):
        spec = dataclasses.replace(make_spec(f"x{i}", kind="slow.kind"), estimated_t1=None)
        s.submit(spec, now=10.0 * i)
        s.schedule(10.0 * i)
        s.complete(f"x{i}", now=10.0 * i + 3.0)
    # Prior of 1 s with weight 2, then twenty 3 s samples: (2 * 1 + 20 * 3) / 22.
    assert s.estimator.estimate("slow.kind") == pytest.approx(62 / 22)
    acc = s.estimator.accuracy()["slow.kind"]
    assert acc.count == 20
    assert acc.mape < 0.5


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    """Capacity is never exceeded, usage matches running units, and every action finishes."""
    rng = random.Random(seed)
    cap = {"cpu": 16.0, "gpu": 2.0}
    s = make_scheduler(cap, max_wait_s=30.0)
    running: dict[str, tuple[float, dict[str, float]]] = {}
    units: dict[str, int] = {}
    demands: dict[str, dict[str, float]] = {}
    now, submitted, done = 0.0, 0, set()
    while submitted < 400 or running or s.queued:
        if submitted < 400 and rng.random() < 0.6:
            kind = rng.choice(["cpu", "gpu", "both"])
            demand = {"cpu": {"cpu": 1.0}, "gpu": {"gpu": 0.5}, "both": {"cpu": 2.0, "gpu": 1.0}}[
                kind
            ]
            spec = make_spec(
                f"a{submitted}",
                kind=kind,
                demand=demand,
                est=rng.expovariate(1.0),
                max_units=rng.choice([1, 1, 4, 8]) if kind == "cpu" else 1,
            )
            s.submit(spec, now=now)
            demands[spec.id] = demand
            submitted += 1
        plan = s.schedule(now)
        for st in plan.starts:
            units[st.action_id] = st.units
            running[st.action_id] = (now + rng.expovariate(1.0), demands[st.action_id])
        for rz in plan.resizes:
            assert rz.action_id in running
            units[rz.action_id] = rz.units
        used = {r: 0.0 for r in cap}
        for a, (_, dem) in running.items():
            for r, d in dem.items():
                used[r] += d * units[a]
        for r in cap:
            assert used[r] <= cap[r] + 1e-9
            assert s.usage()[r] == pytest.approx(used[r])
        now += rng.expovariate(4.0)
        for a in [a for a, (end, _) in running.items() if end <= now]:
            del running[a]
            s.complete(a, now=now)
            done.add(a)
    assert len(done) == 400


def test_same_inputs_same_plans():
    def run() -> list:
        s = make_scheduler({"cpu": 8})
        out = []
        for i in range(30):
            s.submit(make_spec(f"a{i}", est=1 + (i * 7) % 5, max_units=1 + i % 4), now=float(i))
            out.append(s.schedule(float(i)))
            if i % 3 == 2:
                for st in out[-1].starts[:1]:
                    s.complete(st.action_id, now=float(i) + 0.5)
        return out

    assert run() == run()
