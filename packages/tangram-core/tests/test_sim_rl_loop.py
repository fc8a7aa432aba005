"""The RL-loop model: exact timelines on hand-computable cases, sync == async at staleness 0,
the staleness bound under an adversarial length mix, and clear errors for bad configs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tangram_core.elastic_scheduler import ElasticScheduler
from tangram_core.sim import (
    CodeAgentWorkload,
    DecodeModel,
    RLLoopConfig,
    RolloutWorkload,
    TrainerModel,
    simulate_rl_loop,
)

pytestmark = pytest.mark.usefixtures("no_ray")

# Deterministic tools: every call runs exactly exec_median_s on one core.
FIXED_TOOLS = CodeAgentWorkload(
    exec_median_s=0.4, exec_sigma=0.0, tail_fraction=0.0, tests_fraction=0.0
)


def fixed(tokens: int = 100, *, turns: int = 1, groups: int = 1, group_size: int = 1, **kw: Any):
    """A workload whose every sample has ``turns`` turns of exactly ``tokens`` tokens."""
    return RolloutWorkload(
        groups_per_step=groups,
        group_size=group_size,
        min_turns=turns,
        max_turns=turns,
        tokens_median=float(tokens),
        tokens_sigma=0.0,
        reward="rule",
        rule_reward_s=0.5,
        actions=FIXED_TOOLS,
        **kw,
    )


def make_config(**overrides: Any) -> RLLoopConfig:
    """One engine with a = 10 ms and b = 2 ms per sequence, U = 2 s, S = 1 s, 2 cores."""
    base: dict[str, Any] = {
        "engines": 1,
        "engine": DecodeModel(step_base_s=0.01, step_per_seq_s=0.002, max_batch=8),
        "workload": fixed(),
        "trainer": TrainerModel(update_s=2.0, sync_s=1.0),
        "steps": 2,
        "capacity": {"cpu": 2.0},
    }
    base.update(overrides)
    return RLLoopConfig(**base)


def long_tail(**kw: Any) -> RolloutWorkload:
    """Mostly short turns, a heavy Pareto tail to 20k tokens, multi-turn with tool calls."""
    base: dict[str, Any] = {
        "groups_per_step": 4,
        "group_size": 4,
        "min_turns": 1,
        "max_turns": 3,
        "tokens_median": 150.0,
        "tokens_sigma": 1.0,
        "tail_fraction": 0.08,
        "tail_min_tokens": 2000.0,
        "tail_alpha": 1.0,
        "max_tokens_per_turn": 20_000,
    }
    base.update(kw)
    return RolloutWorkload(**base)


def cluster(**overrides: Any) -> RLLoopConfig:
    base: dict[str, Any] = {
        "engines": 4,
        "engine": DecodeModel(step_base_s=0.01, step_per_seq_s=0.0005, max_batch=16),
        "workload": long_tail(),
        "trainer": TrainerModel(update_s=5.0, sync_s=0.5),
        "steps": 8,
        "capacity": {"cpu": 16.0, "gpu": 4.0},
        "seed": 3,
    }
    base.update(overrides)
    return RLLoopConfig(**base)


# -- hand-computed timelines ---------------------------------------------------------------------


def test_sync_two_samples_share_the_engine_exactly():
    # Both samples decode together: step 0.01 + 2 * 0.002 = 0.014 s, 100 steps = 1.4 s. The rule
    # reward takes 0.5 s, the update 2 s; then the engine loads weights for 1 s (no decoding).
    r = simulate_rl_loop(make_config(workload=fixed(group_size=2)))
    assert r.update_end_s == pytest.approx((3.9, 8.8), rel=1e-12)
    assert r.samples_trained == 4
    assert r.samples_per_s == pytest.approx(4 / 8.8)
    assert r.engine_idle == pytest.approx(1 - 2.8 / 8.8)
    assert r.engine_sync_stall == pytest.approx(1 / 8.8)
    assert r.mean_batch_decoding == pytest.approx(2.0)
    assert r.batch_occupancy == pytest.approx(2 * 2.8 / (8.8 * 8))
    assert r.act["reward"]["mean"] == pytest.approx(0.5)
    assert r.max_staleness_seen == 0


def test_max_batch_queues_sequences_in_the_engine():
    # max_batch 1: the second sample joins when the first leaves (1.2 s), and ends at 2.4 s.
    engine = DecodeModel(step_base_s=0.01, step_per_seq_s=0.002, max_batch=1)
    r = simulate_rl_loop(make_config(engine=engine, workload=fixed(group_size=2), steps=1))
    assert r.update_end_s == pytest.approx((2.4 + 0.5 + 2.0,), rel=1e-12)
    assert r.mean_batch_decoding == pytest.approx(1.0)


def test_multi_turn_trajectory_leaves_the_engine_during_its_tool_call():
    # 100 tokens (1.2 s), a 0.4 s tool call on the CPU pool, 100 tokens, 0.5 s reward, 2 s update.
    r = simulate_rl_loop(make_config(workload=fixed(turns=2), steps=1))
    assert r.update_end_s == pytest.approx((1.2 + 0.4 + 1.2 + 0.5 + 2.0,), rel=1e-12)
    assert r.engine_idle == pytest.approx(1 - 2.4 / 5.3)
    assert r.act["sandbox"]["mean"] == pytest.approx(0.4)
    assert r.actions.kinds == ["sandbox.run", "reward.rule"]


def test_async_pipeline_is_trainer_bound_exactly():
    # max_staleness 1: two groups start at once and finish at 1.9 s. The trainer then runs
    # back to back (U + S = 11 s per update), each next group (1 s load, 1.2 s decode, 0.5 s
    # reward) being ready before the trainer is free.
    trainer = TrainerModel(update_s=10.0, sync_s=1.0)
    r = simulate_rl_loop(make_config(mode="async", max_staleness=1, trainer=trainer, steps=4))
    assert r.update_end_s == pytest.approx((11.9, 22.9, 33.9, 44.9), rel=1e-12)
    assert [s.staleness for s in r.samples] == [0, 1, 1, 1]
    assert [s.used_at_version for s in r.samples] == [0, 1, 2, 3]
    assert r.max_staleness_seen == 1
    assert r.restarts == 0
    sync = simulate_rl_loop(make_config(trainer=trainer, steps=4))
    # sync: 1.2 s decode + 0.5 s reward + 10 s update, and 1 s sync between updates
    assert sync.update_end_s == pytest.approx((11.7, 24.4, 37.1, 49.8), rel=1e-12)
    assert r.samples_per_s > sync.samples_per_s


# -- sync and async ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_flight", ["continue", "drop"])
def test_async_with_zero_staleness_is_sync_exactly(in_flight):
    # Exact, not approximate: with max_staleness 0 only one batch is ever in flight, so the
    # async loop takes the same events in the same order as the sync one.
    sync = simulate_rl_loop(cluster())
    asyn = simulate_rl_loop(cluster(mode="async", max_staleness=0, in_flight=in_flight))
    assert asyn.samples_trained == sync.samples_trained == 8 * 16
    assert asyn.update_end_s == sync.update_end_s
    assert [s.trajectory for s in asyn.samples] == [s.trajectory for s in sync.samples]
    assert asyn.engine_idle == sync.engine_idle
    assert asyn.restarts == 0
    assert asyn.max_staleness_seen == 0


def test_async_overlaps_the_long_tail():
    sync = simulate_rl_loop(cluster())
    asyn = simulate_rl_loop(cluster(mode="async", max_staleness=2))
    assert asyn.samples_per_s > 1.3 * sync.samples_per_s
    assert asyn.engine_idle < sync.engine_idle
    assert asyn.batch_occupancy > sync.batch_occupancy
    assert sync.engine_idle > 0.5  # the engines wait for the tail and for every update


@pytest.mark.parametrize("in_flight", ["continue", "drop"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_staleness_bound_holds_under_adversarial_lengths(k, in_flight):
    # Half the turns are in a Pareto tail with infinite mean (alpha 0.7), capped at 30k tokens,
    # the rest a few dozen tokens; the trainer is fast, so versions advance while the long
    # ones decode and they must be restarted.
    w = long_tail(tail_fraction=0.5, tail_alpha=0.7, tokens_median=30.0, max_tokens_per_turn=30_000)
    cfg = cluster(mode="async", max_staleness=k, in_flight=in_flight, workload=w, steps=10, seed=k)
    r = simulate_rl_loop(cfg)
    assert r.samples_trained == 10 * 16
    assert r.restarts > 0  # the bound was exercised
    assert r.max_staleness_seen <= k
    for s in r.samples:
        assert all(s.used_at_version - v <= k for v, _ in s.segments), s
        versions = [v for v, _ in s.segments]
        assert versions == sorted(versions)
        if in_flight == "drop":
            assert len(set(versions)) == 1  # restarted at every weight update, never mixed
    if in_flight == "continue":
        assert any(len({v for v, _ in s.segments}) > 1 for s in r.samples)  # partial rollouts


def test_deterministic_for_a_seed():
    a = simulate_rl_loop(cluster(mode="async", max_staleness=1))
    b = simulate_rl_loop(cluster(mode="async", max_staleness=1))
    c = simulate_rl_loop(cluster(mode="async", max_staleness=1, seed=4))
    assert a.update_end_s == b.update_end_s
    assert a.summary() == b.summary()
    assert a.update_end_s != c.update_end_s


def test_external_actions_run_on_the_given_scheduler():
    sched = ElasticScheduler({"cpu": 16.0, "gpu": 4.0})
    r = simulate_rl_loop(cluster(), scheduler=sched)
    assert sched.stats.completed == r.actions.n_actions - sched.running - sched.queued
    assert r.act["reward"]["n"] > 0
    assert r.act["sandbox"]["n"] > 0
    # One core for every tool call: actions queue, and trajectories with them.
    starved = simulate_rl_loop(cluster(capacity={"cpu": 1.0, "gpu": 4.0}))
    assert starved.act["sandbox"]["mean"] > 2 * r.act["sandbox"]["mean"]
    assert starved.makespan_s > r.makespan_s


# -- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "sync", "max_staleness": 2}, r"max_staleness \(2\) applies only to mode='async'"),
        ({"warmup_steps": 2, "steps": 2}, r"warmup_steps \(2\) must be < steps \(2\)"),
        ({"capacity": {"cpu": 2.0}, "workload": RolloutWorkload()}, r"capacity\['gpu'\] \(0.0\)"),
        ({"engines": 0}, r"engines\n  Input should be greater than or equal to 1"),
        ({"mode": "offline"}, r"mode\n  Input should be 'sync' or 'async'"),
    ],
)
def test_bad_config_names_the_problem(overrides, message):
    with pytest.raises(ValidationError, match=message):
        make_config(**overrides)


def test_bad_workload_names_the_problem():
    with pytest.raises(ValidationError, match=r"min_turns \(3\) must be <= max_turns \(2\)"):
        RolloutWorkload(min_turns=3, max_turns=2)
    with pytest.raises(ValidationError, match="update_s"):
        TrainerModel(update_s=0.0)
