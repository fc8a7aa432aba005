"""The Ray-backed orchestrator: one orchestrator in a Ray actor, submitters anywhere.

Every rollout worker of a multi-node RL job (vLLM engines, agent loops, reward callers) can
submit actions to one shared orchestrator, and so to one scheduler over the shared pools. The
orchestrator runs in an async Ray actor. Its managers are built inside that actor by a factory
you pass, typically :class:`~tangram_core.ray.pool.RayActorPoolManager`, whose workers Ray
spreads over the cluster. Actions and results cross as plain dicts and are validated on
arrival, so a bad action fails at the edge with the field named.

    remote = RemoteOrchestrator.start(lambda: [RayActorPoolManager(8)], name="tangram")
    result = await remote.submit(action)            # from any process attached to the cluster
    remote = RemoteOrchestrator.connect("tangram")  # by name, from another job
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

from tangram_core.actions import Action, ActionResult
from tangram_core.orchestrator import Orchestrator, OrchestratorConfig
from tangram_core.resource_manager import ResourceManager

ManagerFactory = Callable[[], Sequence[ResourceManager]]


class _OrchestratorActor:
    """Hosts an :class:`Orchestrator` in the actor's event loop, created on first use."""

    def __init__(self, factory: ManagerFactory, config: dict[str, Any] | None) -> None:
        self._factory = factory
        self._config = OrchestratorConfig(**(config or {}))
        self._orch: Orchestrator | None = None

    async def _get(self) -> Orchestrator:
        if self._orch is None:
            self._orch = Orchestrator(list(self._factory()), config=self._config)
            await self._orch.open()
        return self._orch

    async def submit(self, action: dict[str, Any]) -> dict[str, Any]:
        orch = await self._get()
        result = await orch.submit(Action.model_validate(action))
        return result.model_dump(mode="json")

    async def cancel_trajectory(self, trajectory_id: str) -> int:
        return await (await self._get()).cancel_trajectory(trajectory_id)

    async def end_trajectory(self, trajectory_id: str) -> None:
        (await self._get()).end_trajectory(trajectory_id)

    async def capacity(self) -> dict[str, float]:
        return (await self._get()).capacity()

    async def shutdown(self, drain: bool = True) -> None:
        if self._orch is not None:
            await self._orch.shutdown(drain=drain)


class RemoteOrchestrator:
    """Typed client of the orchestrator actor; safe to pass to other Ray tasks and actors."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    @classmethod
    def start(
        cls,
        factory: ManagerFactory,
        *,
        name: str | None = None,
        config: OrchestratorConfig | None = None,
        num_cpus: float = 0.0,
    ) -> RemoteOrchestrator:
        """Start the actor; ``name`` makes it findable with :meth:`connect` (detached off)."""
        options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": 10_000}
        if name is not None:
            options["name"] = name
        actor_cls = ray.remote(_OrchestratorActor).options(**options)
        payload = config.model_dump() if config is not None else None
        return cls(actor_cls.remote(factory, payload))

    @classmethod
    def connect(cls, name: str) -> RemoteOrchestrator:
        try:
            return cls(ray.get_actor(name))
        except ValueError as exc:
            raise LookupError(f"no Tangram orchestrator actor named {name!r} is running") from exc

    async def submit(self, action: Action) -> ActionResult:
        result = await self.actor.submit.remote(action.model_dump(mode="json"))
        return ActionResult.model_validate(result)

    async def cancel_trajectory(self, trajectory_id: str) -> int:
        return int(await self.actor.cancel_trajectory.remote(trajectory_id))

    async def end_trajectory(self, trajectory_id: str) -> None:
        await self.actor.end_trajectory.remote(trajectory_id)

    async def capacity(self) -> dict[str, float]:
        return dict(await self.actor.capacity.remote())

    async def shutdown(self, drain: bool = True) -> None:
        await self.actor.shutdown.remote(drain)
        ray.kill(self.actor)
