"""``SandboxManager``: the sandbox pool as a tangram-core resource manager.

One worker is one unit of ``cpu``: an action of kind ``sandbox.run`` or ``sandbox.run_tests``
demands one unit and its payload is a :class:`~tangram_sandbox.models.RunRequest` or
:class:`~tangram_sandbox.models.RunTestsRequest`. A ``run_tests`` action may be elastic
(``Elasticity(max_units=...)``): started on ``u`` units, its tests are spread over ``u``
workers. The orchestrator schedules it per action
and scales the pool through :meth:`scale_to`.

Failure mapping, which the orchestrator's retry policy rests on: a ``sandbox_error`` result
(the worker died, the supervisor failed) is infrastructure, so it raises
:class:`~tangram_core.resource_manager.WorkerLost` and is retried within budget; the program's
own failures (runtime error, timeout, wrong answer) are results, returned as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from tangram_core.actions import Action
from tangram_core.resource_manager import ResourceManager, WorkerLost
from tangram_sandbox.actions import KIND_RUN, KIND_RUN_TESTS, KINDS, request_of
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import RunResult, RunStatus, RunTestsRequest, RunTestsResult
from tangram_sandbox.pool import SandboxPool

__all__ = ["KIND_RUN", "KIND_RUN_TESTS", "SandboxManager"]


class SandboxManager(ResourceManager):
    """Runs ``sandbox.*`` actions on a :class:`SandboxPool`; capacity = warm workers."""

    kinds = KINDS
    warmup_s = 0.1  # a zygote start: interpreter, preloads, namespaces
    unit_cost = 1.0

    def __init__(
        self, config: PoolConfig | None = None, *, name: str = "sandbox", resource: str = "cpu"
    ) -> None:
        self.name = name
        self.resource = resource
        self.pool = SandboxPool(config or PoolConfig())
        # the runs under way, so that cancel() can stop one: the orchestrator also cancels the
        # task awaiting start(), but a caller across a process (the Ray host of
        # RaySandboxManager) has only the action id, so this path is the contract's
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._opened = False

    def resources(self) -> dict[str, float]:
        return {self.resource: float(self.pool.size)}

    def limits(self) -> dict[str, float]:
        return {self.resource: float(self.pool.config.max_workers)}

    def health(self) -> bool:
        return self.pool.healthy()

    async def open(self) -> None:
        """Start the pool once; later calls return at once (a caller may open it early, e.g. to
        size a static baseline from the real pool before the orchestrator opens it again)."""
        if self._opened:
            return
        self._opened = True
        await self.pool.start()

    async def start(self, action: Action, units: int) -> Any:
        request = request_of(action)  # InvalidPayload names every bad field
        # A run_tests action started on several units spreads its tests over that many workers:
        # the scheduler counted them as taken, so they are idle for it.
        call: Coroutine[Any, Any, RunResult | RunTestsResult] = (
            self.pool.run_tests(request, workers=units)
            if isinstance(request, RunTestsRequest)
            else self.pool.run(request)
        )
        task = asyncio.ensure_future(call)
        self._running[action.id] = task
        try:
            result = await task
        finally:
            self._running.pop(action.id, None)
        if result.status is RunStatus.SANDBOX_ERROR:
            raise WorkerLost(f"sandbox: {result.error}", action_id=action.id)
        return result.model_dump(mode="json")

    async def cancel(self, action_id: str) -> bool:
        task = self._running.get(action_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def scale_to(self, n_units: int) -> None:
        await self.pool.scale_to(n_units)

    async def shutdown(self, drain: bool = True) -> None:
        await self.pool.close(drain=drain)
