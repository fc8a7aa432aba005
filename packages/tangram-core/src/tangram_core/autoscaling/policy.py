"""Pool autoscaling: how many units each resource manager should hold, as a pure function.

Why a function of a context (the Ray Serve autoscaling-policy shape): it is trivially testable,
the simulator and the runtime call the same code, and swapping a policy is one argument.
:func:`apply_policy` holds the clamps and damping that every policy shares, so a policy only says
what it would like.

The default, :func:`queue_delay_policy`, weighs warm-up against queueing, as the paper digest
asks: it scales up only when the work already queued would wait longer than a new unit takes to
warm up. It scales down only after the pool has been over-provisioned for
``downscale_delay_s``, and then by at most ``downscale_step`` of the pool at a time. Scale-down
is damped because a cold start costs ``warmup_s`` while an idle unit costs only its price.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingConfig(BaseModel):
    """Bounds and damping for one pool; field errors quote the values."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_units: int = Field(0, ge=0, description="Never scale below this many units.")
    max_units: int = Field(1, ge=1, description="Never scale above this many units.")
    target_utilisation: float = Field(
        0.8, gt=0, le=1, description="Busy share of the pool to aim for when sizing it."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="How long the pool must be too big before it shrinks."
    )
    downscale_step: float = Field(
        0.25, gt=0, le=1, description="Largest share of the pool removed in one decision."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_units < self.min_units:
            raise ValueError(
                f"max_units ({self.max_units}) must be >= min_units ({self.min_units})"
            )
        return self


@dataclass(frozen=True, slots=True)
class PoolContext:
    """What a policy may look at; built by the driver from the scheduler and the manager."""

    now: float
    current_units: int
    busy_units: float  # units running actions right now
    queued_units: float  # minimum units the queued actions need
    queued_work_s: float  # estimated single-unit seconds of work waiting in the queue
    warmup_s: float  # how long a new unit takes to become usable


@dataclass(frozen=True, slots=True)
class AutoscalingState:
    """What a policy remembers between decisions."""

    over_since: float | None = None  # when the pool first became bigger than needed


Policy = Callable[[PoolContext, AutoscalingState, AutoscalingConfig], tuple[int, AutoscalingState]]


def queue_delay_policy(
    ctx: PoolContext, state: AutoscalingState, config: AutoscalingConfig
) -> tuple[int, AutoscalingState]:
    """Size the pool for the running and queued demand, when waiting costs more than warming up."""
    needed = math.ceil((ctx.busy_units + ctx.queued_units) / config.target_utilisation)
    units = max(ctx.current_units, 1)
    expected_wait_s = ctx.queued_work_s / units
    if needed > ctx.current_units:
        if ctx.queued_units > 0 and expected_wait_s < ctx.warmup_s:
            return ctx.current_units, replace(state, over_since=None)  # the queue drains sooner
        return needed, replace(state, over_since=None)
    if needed < ctx.current_units:
        over_since = state.over_since if state.over_since is not None else ctx.now
        if ctx.now - over_since < config.downscale_delay_s:
            return ctx.current_units, replace(state, over_since=over_since)
        step = max(1, math.floor(config.downscale_step * ctx.current_units))
        return max(needed, ctx.current_units - step), replace(state, over_since=ctx.now)
    return ctx.current_units, replace(state, over_since=None)


def apply_policy(
    policy: Policy, ctx: PoolContext, state: AutoscalingState, config: AutoscalingConfig
) -> tuple[int, AutoscalingState]:
    """Run ``policy`` and clamp its answer to the pool's bounds; never below what is running."""
    target, state = policy(ctx, state, config)
    floor_units = max(config.min_units, math.ceil(ctx.busy_units))
    return min(max(target, floor_units), config.max_units), state
