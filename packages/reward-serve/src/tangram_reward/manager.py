"""``RewardManager``: a Ray Serve reward deployment as a tangram-core resource manager.

The orchestrator sees a pool of *request slots*: capacity is replicas x concurrency per replica,
in a resource type of the user's choosing (``"reward"``, or one per model such as
``"reward.math"``). An action's payload holds the keyword arguments of the deployment's
``score`` method:

* rules: ``{"request": {"response": ..., "reference": ..., "rules": [...]}}``
* scalar reward model: ``{"prompt": ..., "response": ..., "model_id": ...}``
* generative judge: ``{"prompt": ..., "response": ...}``; a reply with no usable score ends
  the action ``ERROR`` with ``error_type`` ``"JudgeParseError"`` (never a reward of 0)

The replica count (hence capacity and health) is read from Serve's controller in the
background every ``status_poll_s``, not on each query: the orchestrator asks for capacity on
every submission and completion, and ``serve.status()`` is a blocking controller round trip
(27 ms on a quiet 2-core machine), which held the event loop for about 80 ms per action and
capped a rule deployment at about 9 rewards per second. A change it sees is passed on to the
orchestrator at once (:meth:`~tangram_core.resource_manager.ResourceManager.capacity_changed`).

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
import contextlib
import logging
import math
from typing import Any

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_core import semconv
from tangram_core.actions import Action
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost
from tangram_reward.serve_control import running_replicas, scale_deployment, wait_for_replicas
from tangram_reward.tracing import current_carrier

logger = logging.getLogger(__name__)


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
    status_poll_s: float = Field(
        0.5, gt=0, description="How often the replica count is read from Serve's controller."
    )

    @model_validator(mode="after")
    def _bounds(self) -> RewardManagerConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


def _is_replica_death(exc: BaseException) -> bool:
    """Failures of the service, not of the request: retried by the orchestrator.

    Serve's ``BackPressureError`` (the replicas' queues are full) counts too: the request was
    never run, and it will fit once the queue drains."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError

    lost = tuple(
        getattr(rex, name)
        for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError")
        if hasattr(rex, name)
    )
    return isinstance(exc, (*lost, BackPressureError))


def _record_attribution(result: Any) -> None:
    """Put who produced the reward on the caller's current (action) span too."""
    meta = result.get("meta") if isinstance(result, dict) else getattr(result, "meta", None)
    if not isinstance(meta, dict):
        return
    span = trace.get_current_span()
    for key, attr in (
        ("deployment", semconv.REWARD_DEPLOYMENT),
        ("model_version", semconv.REWARD_MODEL_VERSION),
        ("request_id", semconv.REWARD_REQUEST_ID),
    ):
        if meta.get(key):
            span.set_attribute(attr, str(meta[key]))


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
        self._running: int | None = None  # replicas RUNNING, as last read from the controller
        self._poller: asyncio.Task[None] | None = None

    def _replicas(self) -> int:
        if self._running is None:  # before open(): one direct read
            self._running = running_replicas(self.config.app, self._deployment)
        return self._running

    def _seen(self, running: int) -> None:
        changed = running != self._running
        self._running = running
        if changed:
            self.capacity_changed()

    async def _read(self) -> int:
        return await asyncio.to_thread(running_replicas, self.config.app, self._deployment)

    async def open(self) -> None:
        self._seen(await self._read())
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Keep the replica count fresh, off the event loop."""
        while not self._closed:
            await asyncio.sleep(self.config.status_poll_s)
            try:
                running = await self._read()
            except Exception as exc:  # the controller restarts; keep the last count meanwhile
                logger.warning("%s: cannot read the replica count: %r", self.name, exc)
                continue
            if not self._closed:
                self._seen(running)

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
            result = await response
            _record_attribution(result)
            return result
        except asyncio.CancelledError:
            response.cancel()  # type: ignore[no-untyped-call]  # untyped in Ray 2.60
            raise
        except Exception as exc:
            if _is_replica_death(exc):
                raise WorkerLost(
                    f"reward replica unavailable under {action.id} ({type(exc).__name__}): {exc}"
                ) from exc
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
        self._seen(replicas)

    async def shutdown(self, drain: bool = True) -> None:
        """The deployment outlives the manager (other jobs may use it); this stops our calls."""
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if not drain:
            for response in list(self._inflight.values()):
                response.cancel()
