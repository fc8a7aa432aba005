"""``RaySandboxManager``: a sandbox pool on another node of a Ray cluster, driven from here.

Why: a cluster run's driver holds the orchestrator, but its node is the wrong place for the
sandboxes (it may be a login node, or hold the trainer's GPUs). The pool runs inside an async
Ray actor (:class:`SandboxHost`) wherever the actor's options place it; this proxy is the
:class:`~tangram_core.resource_manager.ResourceManager` the orchestrator drives. It answers
:meth:`resources`, :meth:`limits` and :meth:`health` from what the host reported with its last
answer (the orchestrator asks on every submission, and may not block on a remote call).

Failure contract, as the local manager's: a ``sandbox_error`` result or the host's death (its
node lost, the actor killed) raises :class:`~tangram_core.resource_manager.WorkerLost`, which
the orchestrator retries; a bad payload comes back as tangram-core's ``InvalidPayload``; the
program's own failures are results.

Ray is imported here only (``pip install 'tangram-sandbox[ray]'`` or any Ray install).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tangram_core.actions import Action, InvalidPayload
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost
from tangram_sandbox.actions import KINDS
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.manager import SandboxManager

__all__ = ["RaySandboxManager", "SandboxHost"]

_PROPAGATOR = TraceContextTextMapPropagator()


class SandboxHost:
    """The pool inside a Ray actor; every answer carries the pool's state for the proxy."""

    def __init__(self, config: dict[str, Any], name: str, resource: str) -> None:
        from tangram_core.telemetry import configure_telemetry

        configure_telemetry(service_name="tangram-sandbox", serve_metrics=False)
        self.manager = SandboxManager(
            PoolConfig.model_validate(config), name=name, resource=resource
        )

    def state(self) -> dict[str, Any]:
        import ray

        return {
            "resources": self.manager.resources(),
            "limits": self.manager.limits(),
            "healthy": self.manager.health(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def open(self) -> dict[str, Any]:
        await self.manager.open()
        return self.state()

    async def start(
        self, action: dict[str, Any], units: int, carrier: dict[str, str]
    ) -> tuple[str, Any, dict[str, Any]]:
        """``("ok", output)``, ``("lost", message)`` or ``("error", (type, message))``: tags,
        not exceptions, so that Ray's wrapping cannot blur which failure it was. The
        execution's span joins the caller's trace (``carrier``: its W3C trace context)."""
        from opentelemetry import context

        parsed = Action.model_validate(action)
        token = context.attach(_PROPAGATOR.extract(carrier))
        try:
            out = await self.manager.start(parsed, units)
        except WorkerLost as exc:
            return "lost", str(exc), self.state()
        except ActionError as exc:
            return "error", (exc.error_type, exc.message), self.state()
        except InvalidPayload as exc:
            return "error", (type(exc).__name__, str(exc)), self.state()
        finally:
            context.detach(token)
        return "ok", out, self.state()

    async def cancel(self, action_id: str) -> bool:
        return await self.manager.cancel(action_id)

    async def scale_to(self, n_units: int) -> dict[str, Any]:
        await self.manager.scale_to(n_units)
        return self.state()

    async def shutdown(self, drain: bool) -> None:
        await self.manager.shutdown(drain=drain)


class RaySandboxManager(ResourceManager):
    """Runs ``sandbox.*`` actions on a pool in a Ray actor; ``actor_options`` place it
    (``num_cpus``, ``resources``, a ``scheduling_strategy``)."""

    kinds = KINDS
    warmup_s = SandboxManager.warmup_s
    unit_cost = SandboxManager.unit_cost

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        name: str = "sandbox",
        resource: str = "cpu",
        actor_options: dict[str, Any] | None = None,
        open_timeout_s: float = 300.0,
    ) -> None:
        self.name, self.resource = name, resource
        self.open_timeout_s = open_timeout_s
        self.config = config or PoolConfig()
        self.actor_options = dict(actor_options or {})
        self.host: Any = None
        self.node_id: str | None = None
        self._state: dict[str, Any] = {
            "resources": {resource: 0.0},
            "limits": {resource: float(self.config.max_workers)},
            "healthy": False,
        }

    def resources(self) -> dict[str, float]:
        return dict(self._state["resources"])

    def limits(self) -> dict[str, float]:
        return dict(self._state["limits"])

    def health(self) -> bool:
        return bool(self._state["healthy"])

    def _take(self, state: dict[str, Any]) -> None:
        changed = state["resources"] != self._state["resources"]
        self._state = state
        self.node_id = state.get("node_id", self.node_id)
        if changed:
            self.capacity_changed()

    async def open(self) -> None:
        import ray

        if self.host is not None:
            return
        options = {"max_concurrency": 1000, "num_cpus": 0, **self.actor_options}
        self.host = (
            ray.remote(SandboxHost)
            .options(**options)
            .remote(self.config.model_dump(mode="json"), self.name, self.resource)
        )
        try:
            state = await asyncio.wait_for(self.host.open.remote(), self.open_timeout_s)
        except TimeoutError:
            ray.kill(self.host)
            self.host = None
            raise RuntimeError(
                f"{self.name}: the sandbox pool's actor ({options}) could not start within "
                f"{self.open_timeout_s:.0f} s; the cluster has {ray.available_resources()} free. "
                "Lower its num_cpus or give it resources a node offers"
            ) from None
        self._take(state)

    async def start(self, action: Action, units: int) -> Any:
        import ray

        if self.host is None:
            raise RuntimeError(f"{self.name}: start() before open()")
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        call = self.host.start.remote(action.model_dump(mode="json"), units, carrier)
        try:
            tag, value, state = await call
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the host may be gone; nothing left to stop
                await asyncio.shield(self.host.cancel.remote(action.id))
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._state = {**self._state, "healthy": False}
            where = f" on node {self.node_id[:12]}" if self.node_id else ""
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise WorkerLost(
                f"sandbox host{where} died: {type(exc).__name__}: {first}", action_id=action.id
            ) from None
        self._take(state)
        if tag == "lost":
            raise WorkerLost(value, action_id=action.id)
        if tag == "error":
            raise ActionError(value[0], value[1])
        return value

    async def cancel(self, action_id: str) -> bool:
        if self.host is None:
            return False
        try:
            return bool(await self.host.cancel.remote(action_id))
        except Exception:  # the host is gone: the action with it
            return False

    async def scale_to(self, n_units: int) -> None:
        if self.host is None:
            raise RuntimeError(f"{self.name}: scale_to() before open()")
        self._take(await self.host.scale_to.remote(n_units))

    async def shutdown(self, drain: bool = True) -> None:
        import ray

        if self.host is None:
            return
        with contextlib.suppress(Exception):  # a dead host has nothing left to close
            await self.host.shutdown.remote(drain)
        with contextlib.suppress(Exception):
            ray.kill(self.host)
        self.host = None
        self._state = {**self._state, "healthy": False}
