"""The autoscaling loop: applies an autoscaling policy to an orchestrator's managers.

:mod:`tangram_core.autoscaling` decides (pure); this module acts. Every ``interval_s`` it
builds a :class:`~tangram_core.autoscaling.PoolContext` per autoscaled manager, from the
scheduler's queue and usage and the manager's warm-up, asks the policy for a size, and calls
``Orchestrator.scale_to`` when the size changes. It is a separate object so that the
orchestrator keeps running without it, and the loop can be tested one :meth:`step` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from tangram_core.autoscaling.policy import (
    AutoscalingConfig,
    AutoscalingState,
    Policy,
    PoolContext,
    apply_policy,
    queue_delay_policy,
)
from tangram_core.orchestrator import Orchestrator

logger = logging.getLogger(__name__)


class Autoscaler:
    """Sizes each named manager of ``orch`` with ``policy``; use as ``async with``."""

    def __init__(
        self,
        orch: Orchestrator,
        configs: Mapping[str, AutoscalingConfig],
        *,
        policy: Policy = queue_delay_policy,
        interval_s: float = 1.0,
    ) -> None:
        managers = {m.name: m for m in orch.managers}
        unknown = sorted(set(configs) - set(managers))
        if unknown:
            raise KeyError(f"no resource manager named {unknown}; have {sorted(managers)}")
        for name in configs:
            kinds = managers[name].resources()
            if len(kinds) != 1:
                raise ValueError(
                    f"manager {name!r} provides {sorted(kinds)}; autoscaling needs exactly one "
                    f"resource type per manager"
                )
        if interval_s <= 0:
            raise ValueError(f"interval_s ({interval_s}) must be > 0")
        self.orch = orch
        self.configs = dict(configs)
        self.policy = policy
        self.interval_s = interval_s
        self.state = {name: AutoscalingState() for name in configs}
        self._task: asyncio.Task[None] | None = None

    async def step(self, now: float | None = None) -> dict[str, int]:
        """One decision round; returns the new size of every manager that was resized."""
        now = time.monotonic() if now is None else now
        managers = {m.name: m for m in self.orch.managers}
        sched = self.orch.scheduler
        usage, queued, work = sched.usage(), sched.queued_demand(), sched.queued_work_s()
        changed: dict[str, int] = {}
        for name, config in self.configs.items():
            manager = managers[name]
            ((resource, current),) = manager.resources().items()
            ctx = PoolContext(
                now=now,
                current_units=round(current),
                busy_units=usage.get(resource, 0.0),
                queued_units=queued.get(resource, 0.0),
                queued_work_s=work.get(resource, 0.0),
                warmup_s=manager.warmup_s,
            )
            target, self.state[name] = apply_policy(self.policy, ctx, self.state[name], config)
            if target != ctx.current_units:
                logger.info("autoscaling %s: %d -> %d units", name, ctx.current_units, target)
                await self.orch.scale_to(name, target)
                changed[name] = target
        return changed

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # a failed scale must not stop the loop; it is retried next round
                logger.exception("autoscaling step failed")
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> Autoscaler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
