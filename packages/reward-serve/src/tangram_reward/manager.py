"""``RewardManager``: a Ray Serve reward deployment as a tangram-core resource manager.

The orchestrator sees a pool of *request slots*: capacity is replicas x concurrency per replica,
in a resource type of the user's choosing (``"reward"``, or one per model such as
``"reward.math"``). An action's payload holds the keyword arguments of the deployment's
``score`` method:

* rules: ``{"request": {"response": ..., "reference": ..., "rules": [...]}}``
* scalar reward model: ``{"prompt": ..., "response": ..., "model_id": ...}``

``scale_to`` drives Serve's external scaler (the application must run with
``external_scaler_enabled=True``) and waits until the replicas serve. ``warmup_s`` tells the
autoscaler what a new replica costs; measure it with ``tools/bench/reward_serve.py``. If
external scaling is off, Serve's own autoscaler can size the deployment instead, and this
manager then only reads the replica count.

Failures follow the orchestrator's contract: a replica that dies under a request raises
:class:`~tangram_core.resource_manager.WorkerLost` (retried), and a bad request raises
:class:`~tangram_core.resource_manager.ActionError` with the real error class (not retried).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_core.actions import Action
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost
from tangram_reward.serve_app import running_replicas, scale_deployment, wait_for_replicas
from tangram_reward.tracing import current_carrier


class RewardManagerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    app: str = Field(min_length=1, description="Serve application name.")
    deployment: str | None = Field(None, description="Deployment name; the app name if unset.")
    kinds: tuple[str, ...] = Field(("reward.*",), min_length=1)
    resource: str = Field("reward", min_length=1, description="Resource type actions demand.")
    concurrency_per_replica: int = Field(8, ge=1, description="Slots per replica.")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    warmup_s: float = Field(2.0, ge=0, description="Time for a new replica to serve.")
    unit_cost: float = Field(0.0, ge=0)
    scale_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> RewardManagerConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


def _is_replica_death(exc: BaseException) -> bool:
    from ray import exceptions as rex

    lost = tuple(
        getattr(rex, name)
        for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError")
        if hasattr(rex, name)
    )
    return isinstance(exc, lost)


class RewardManager(ResourceManager):
    """Runs ``reward.*`` actions on a Serve deployment; scales it per pending action."""

    def __init__(self, config: RewardManagerConfig) -> None:
        from ray import serve

        self.config = config
        self.name = f"reward:{config.app}"
        self.kinds = frozenset(config.kinds)
        self.warmup_s = config.warmup_s
        self.unit_cost = config.unit_cost
        self._deployment = config.deployment or config.app
        self._handle = serve.get_deployment_handle(self._deployment, app_name=config.app)
        self._inflight: dict[str, Any] = {}
        self._closed = False

    def _replicas(self) -> int:
        return running_replicas(self.config.app, self._deployment)

    def resources(self) -> dict[str, float]:
        return {self.config.resource: float(self._replicas() * self.config.concurrency_per_replica)}

    def limits(self) -> dict[str, float]:
        slots = self.config.max_replicas * self.config.concurrency_per_replica
        return {self.config.resource: float(slots)}

    def health(self) -> bool:
        return not self._closed and self._replicas() > 0

    async def start(self, action: Action, units: int) -> Any:
        if self._closed:
            raise RuntimeError(f"{self.name} is shut down")
        # The replica opens its scoring span as a child of ours (see tangram_reward.tracing).
        response = self._handle.score.remote(**action.payload, trace_context=current_carrier())
        self._inflight[action.id] = response
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            if _is_replica_death(exc):
                raise WorkerLost(f"reward replica died under {action.id}: {exc}") from exc
            cause = getattr(exc, "cause", None) or exc
            raise ActionError(type(cause).__name__, str(cause).splitlines()[-1]) from exc
        finally:
            self._inflight.pop(action.id, None)

    async def cancel(self, action_id: str) -> bool:
        response = self._inflight.get(action_id)
        if response is None:
            return False
        response.cancel()
        return True

    async def scale_to(self, n_units: int) -> None:
        cfg = self.config
        replicas = math.ceil(n_units / cfg.concurrency_per_replica)
        if replicas > cfg.max_replicas:
            raise ValueError(
                f"{self.name}: {n_units} slots need {replicas} replicas, more than max_replicas "
                f"({cfg.max_replicas}); raise max_replicas or lower the demand"
            )
        replicas = max(replicas, cfg.min_replicas)
        scale_deployment(cfg.app, self._deployment, replicas)
        await wait_for_replicas(cfg.app, self._deployment, replicas, cfg.scale_timeout_s)

    async def shutdown(self, drain: bool = True) -> None:
        """The deployment outlives the manager (other jobs may use it); this stops our calls."""
        self._closed = True
        if not drain:
            for response in list(self._inflight.values()):
                response.cancel()
