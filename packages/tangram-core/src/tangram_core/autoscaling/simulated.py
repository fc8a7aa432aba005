"""Autoscaled pools on the simulator's virtual clock: the runtime's policy, and what it costs.

Why: the paper's resource saving comes from pools that follow the load, not from a smaller
fixed pool. The runtime's :class:`~tangram_core.autoscaling.loop.Autoscaler` asks
:func:`~tangram_core.autoscaling.apply_policy` how big each manager should be; here the same
pure policy sizes virtual pools every ``period_s``, so the simulated saving is the one the
runtime's policy would give, warm-up delays and damped scale-down included.

What is counted: a unit costs from the moment it is asked for (it warms up for ``warmup_s``
before the scheduler can use it) until it is released. :attr:`SimResult.provisioned` holds
those unit-seconds per resource; static provisioning pays its whole capacity for the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from tangram_core.autoscaling.policy import (
    AutoscalingConfig,
    AutoscalingState,
    Policy,
    PoolContext,
    apply_policy,
    queue_delay_policy,
)
from tangram_core.scheduler import Scheduler

__all__ = ["PoolScaling", "SimAutoscaling"]


class PoolScaling(BaseModel):
    """One autoscaled resource type: its bounds and damping, and how long a new unit warms up."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    config: AutoscalingConfig
    warmup_s: float = Field(0.0, ge=0, description="From asking for a unit to it being usable.")


class SimAutoscaling(BaseModel):
    """Which resource types the simulator autoscales, and how often it decides."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    pools: dict[str, PoolScaling] = Field(..., min_length=1)
    period_s: float = Field(1.0, gt=0, description="Seconds between two sizing decisions.")
    policy: Policy = queue_delay_policy


class PoolTracker:
    """Runtime state of the autoscaled pools during one simulation (the simulator owns it)."""

    def __init__(self, spec: SimAutoscaling, scheduler: Scheduler, now: float) -> None:
        self.spec = spec
        self.sched = scheduler
        capacity = scheduler.capacity()
        unknown = sorted(set(spec.pools) - set(capacity))
        if unknown:
            raise ValueError(
                f"autoscaled resources {unknown} are not in the scheduler's capacity "
                f"{sorted(capacity)}"
            )
        self.ready = {r: float(capacity[r]) for r in spec.pools}
        for r, pool in spec.pools.items():
            self.ready[r] = min(max(self.ready[r], pool.config.min_units), pool.config.max_units)
        self.pending = dict.fromkeys(spec.pools, 0.0)
        self.states = {r: AutoscalingState() for r in spec.pools}
        self.provisioned = dict.fromkeys(spec.pools, 0.0)
        self._last = now
        self._limits_set = False  # the first apply sets the limits, whatever the capacity
        self._apply()

    def account(self, now: float) -> None:
        """Add the unit-seconds held (ready or warming) since the last call."""
        dt = now - self._last
        if dt > 0:
            for r in self.ready:
                self.provisioned[r] += (self.ready[r] + self.pending[r]) * dt
        self._last = now

    def decide(self, now: float) -> list[tuple[float, str, float]]:
        """Size every pool now; returns the (time, resource, units) of units that will warm up.

        Shrinking takes effect at once: the policy never goes below the busy units, so only
        idle ones leave."""
        self.account(now)
        usage = self.sched.usage()
        queued = self.sched.queued_demand()
        work = self.sched.queued_work_s()
        arrivals: list[tuple[float, str, float]] = []
        for r, pool in self.spec.pools.items():
            current = self.ready[r] + self.pending[r]
            ctx = PoolContext(
                now=now,
                current_units=math.ceil(current),
                busy_units=usage.get(r, 0.0),
                queued_units=queued.get(r, 0.0),
                queued_work_s=work.get(r, 0.0),
                warmup_s=pool.warmup_s,
            )
            target, self.states[r] = apply_policy(
                self.spec.policy, ctx, self.states[r], pool.config
            )
            if target > current:
                self.pending[r] += target - current
                arrivals.append((now + pool.warmup_s, r, target - current))
            elif target < current:
                self.ready[r] = max(self.ready[r] - (current - target), 0.0)
        self._apply()
        return arrivals

    def arrive(self, resource: str, units: float, now: float) -> None:
        """Units asked for ``warmup_s`` ago are ready."""
        self.account(now)
        self.pending[resource] -= units
        self.ready[resource] += units
        self._apply()

    def _apply(self) -> None:
        current = self.sched.capacity()
        if self._limits_set and all(current.get(r) == v for r, v in self.ready.items()):
            return  # nothing changed: keep the scheduler's caches
        self._limits_set = True
        capacity: Mapping[str, float] = {**current, **self.ready}
        limits = {
            **self.sched.capacity(),
            **{r: float(p.config.max_units) for r, p in self.spec.pools.items()},
        }
        self.sched.set_capacity(capacity, limits)
