"""The autoscaling policy: warm-up against queueing, damped scale-down, shared clamps."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tangram_core.autoscaling import (
    AutoscalingConfig,
    AutoscalingState,
    PoolContext,
    apply_policy,
    queue_delay_policy,
)

CONFIG = AutoscalingConfig(min_units=1, max_units=32, downscale_delay_s=30.0, downscale_step=0.25)


def decide(state=None, config=CONFIG, **ctx):
    fields = {
        "now": 0.0,
        "current_units": 8,
        "busy_units": 0.0,
        "queued_units": 0.0,
        "queued_work_s": 0.0,
        "warmup_s": 5.0,
    } | ctx
    return apply_policy(
        queue_delay_policy, PoolContext(**fields), state or AutoscalingState(), config
    )


def test_scales_up_when_queueing_costs_more_than_warmup():
    # 8 units busy, 8 more queued with 400 s of work: a wait of 50 s beats a 5 s warm-up.
    target, _ = decide(busy_units=8, queued_units=8, queued_work_s=400.0)
    assert target == 20  # (8 + 8) / 0.8


def test_does_not_scale_up_for_a_queue_that_drains_before_warmup():
    target, _ = decide(busy_units=8, queued_units=2, queued_work_s=8.0, warmup_s=5.0)
    assert target == 8  # 8 s of work over 8 units waits 1 s: a cold unit would arrive later


def test_scale_up_is_capped_by_max_units():
    target, _ = decide(busy_units=8, queued_units=1000, queued_work_s=1e6)
    assert target == 32


def test_scale_down_is_delayed_then_stepped():
    state = AutoscalingState()
    target, state = decide(state, now=0.0, current_units=16, busy_units=1)
    assert target == 16  # too big, but only just noticed
    target, state = decide(state, now=29.0, current_units=16, busy_units=1)
    assert target == 16
    target, state = decide(state, now=31.0, current_units=16, busy_units=1)
    assert target == 12  # a quarter at a time
    target, state = decide(state, now=40.0, current_units=12, busy_units=1)
    assert target == 12  # the delay starts again after each step


def test_demand_returning_resets_the_scale_down_clock():
    state = AutoscalingState()
    _, state = decide(state, now=0.0, current_units=16, busy_units=1)
    _, state = decide(state, now=20.0, current_units=16, busy_units=13)
    assert state.over_since is None
    target, _ = decide(state, now=40.0, current_units=16, busy_units=1)
    assert target == 16


def test_never_below_what_is_running_or_min_units():
    eager = CONFIG.model_copy(update={"downscale_delay_s": 0.0, "downscale_step": 1.0})
    target, _ = decide(config=eager, current_units=16, busy_units=3.5)
    assert target == 5  # ceil(3.5 / 0.8); and never below ceil(3.5) running
    target, _ = decide(
        config=AutoscalingConfig(min_units=4, max_units=8, downscale_delay_s=0),
        current_units=8,
        busy_units=0,
    )
    assert target >= 4


def test_config_errors_quote_the_values():
    with pytest.raises(ValidationError, match=r"max_units \(2\) must be >= min_units \(4\)"):
        AutoscalingConfig(min_units=4, max_units=2)
