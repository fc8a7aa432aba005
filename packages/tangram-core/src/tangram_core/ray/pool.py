"""``RayActorPoolManager``: actions run in a pool of Ray actors, anywhere on a Ray cluster.

This is how Tangram scales past one machine. The orchestrator and scheduler stay in the driver;
the workers are Ray actors that Ray places on any node with free ``num_cpus_per_worker``. The
payload contract is the process pool's (``{"fn": "module:function", "args": [...],
"kwargs": {...}}``), so an action moves between the two by changing its kind.

Failure contract: an actor that dies under an action (killed, its node lost) raises
:class:`~tangram_core.resource_manager.WorkerLost`. The orchestrator retries the action, and the
pool replaces the actor. An exception in the function comes back as itself, is reported as the
action's error, and is not retried. Cancelling an action kills its actor, because Ray cannot
interrupt a running actor task, and starts a fresh one.

Ray is imported here and nowhere else in tangram-core (``pip install 'tangram-core[ray]'``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import exceptions as ray_errors

from tangram_core.actions import Action
from tangram_core.function_call import parse_function_call, resolve_function
from tangram_core.resource_manager import ResourceManager, WorkerLost


class RayPoolConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "ray"
    kinds: tuple[str, ...] = Field(("ray.*",), min_length=1)
    resource: str = Field("cpu", description="Resource type; one worker is one unit.")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs each actor reserves.")
    allowed_functions: tuple[str, ...] = ("*",)
    warmup_s: float = Field(1.0, ge=0, description="Seconds for a new actor to be ready.")
    unit_cost: float = Field(0.0, ge=0)


class _Worker:
    """The actor: imports each function once and calls it."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: str, args: list[Any], kwargs: dict[str, Any], units: int) -> Any:
        func, wants_units = resolve_function(fn, self._cache)
        return func(*args, **({**kwargs, "units": units} if wants_units else kwargs))


class RayActorPoolManager(ResourceManager):
    """A resizable pool of Ray actors; each running action holds ``units`` of them."""

    supports_resize = False

    def __init__(
        self,
        workers: int = 1,
        *,
        max_workers: int | None = None,
        config: RayPoolConfig | None = None,
    ) -> None:
        self.config = config or RayPoolConfig()
        if workers < 0 or (max_workers is not None and max_workers < workers):
            raise ValueError(f"need 0 <= workers ({workers}) <= max_workers ({max_workers})")
        self.name = self.config.name
        self.kinds = frozenset(self.config.kinds)
        self.warmup_s = self.config.warmup_s
        self.unit_cost = self.config.unit_cost
        self._target = workers
        self._max = max_workers if max_workers is not None else workers
        self._actor_cls = ray.remote(num_cpus=self.config.num_cpus_per_worker)(_Worker)
        self._idle: list[Any] = []
        self._busy: dict[str, tuple[Any, list[Any], Any]] = {}  # id -> (actor, reserved, ref)
        self._cancelled: set[str] = set()
        self._freed = asyncio.Event()
        self._closed = False

    # -- queries --------------------------------------------------------------------------------

    def _size(self) -> int:
        return len(self._idle) + sum(1 + len(r) for _, r, _ in self._busy.values())

    def resources(self) -> dict[str, float]:
        return {self.config.resource: float(self._target)}

    def limits(self) -> dict[str, float]:
        return {self.config.resource: float(self._max)}

    def health(self) -> bool:
        return not self._closed and self._size() >= self._target

    def running(self) -> dict[str, Any]:
        """Action id -> the actor running it (for operators, and tests that kill one)."""
        return {action_id: actor for action_id, (actor, _, _) in self._busy.items()}

    def worker_pids(self) -> list[int]:
        actors = (
            self._idle
            + [a for a, r, _ in self._busy.values()]
            + [x for _, r, _ in self._busy.values() for x in r]
        )
        return list(ray.get([a.pid.remote() for a in actors]))

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._grow()

    async def _grow(self) -> None:
        new: list[Any] = [self._actor_cls.remote() for _ in range(self._target - self._size())]
        if new:
            await asyncio.gather(*[a.pid.remote() for a in new])  # ready when it answers
            self._idle.extend(new)
            self._freed.set()

    async def start(self, action: Action, units: int) -> Any:
        if self._closed:
            raise RuntimeError(f"ray pool {self.name!r} is shut down")
        call = parse_function_call(action, self.name, self.config.allowed_functions)
        await self._grow()
        while len(self._idle) < units:  # the scheduler admits only what fits; this is a guard
            self._freed.clear()
            await self._freed.wait()
        actor, reserved = self._idle.pop(), [self._idle.pop() for _ in range(units - 1)]
        ref = actor.run.remote(call.fn, call.args, call.kwargs, units)
        self._busy[action.id] = (actor, reserved, ref)
        lost = False
        try:
            return await ref
        except ray_errors.RayTaskError as exc:
            cause = exc.cause
            raise (cause if isinstance(cause, Exception) else RuntimeError(str(exc))) from None
        except (ray_errors.RayActorError, ray_errors.ActorUnavailableError) as exc:
            lost = True
            if action.id in self._cancelled:
                raise asyncio.CancelledError from None
            raise WorkerLost(
                f"ray actor died under {action.id}: {exc}", action_id=action.id
            ) from None
        except asyncio.CancelledError:
            lost = True
            ray.kill(actor)
            raise
        finally:
            self._cancelled.discard(action.id)
            self._busy.pop(action.id, None)
            self._release(reserved + ([] if lost else [actor]))

    def _release(self, actors: list[Any]) -> None:
        """Return actors to the pool, retiring any above the target size."""
        for actor in actors:
            if self._size() + 1 > self._target and not self._closed:
                ray.kill(actor)
            elif not self._closed:
                self._idle.append(actor)
            else:
                ray.kill(actor)
        self._freed.set()

    async def cancel(self, action_id: str) -> bool:
        entry = self._busy.get(action_id)
        if entry is None:
            return False
        self._cancelled.add(action_id)
        ray.kill(entry[0])  # an actor task cannot be interrupted; its actor can
        return True

    async def scale_to(self, n_units: int) -> None:
        if not 0 <= n_units <= self._max:
            raise ValueError(f"ray pool {self.name!r}: {n_units} workers is outside 0..{self._max}")
        self._target = n_units
        while self._size() > self._target and self._idle:
            ray.kill(self._idle.pop())
        await self._grow()

    async def shutdown(self, drain: bool = True) -> None:
        self._closed = True
        if drain and self._busy:
            await asyncio.gather(
                *[ref for _, _, ref in self._busy.values()], return_exceptions=True
            )
        for actor, reserved, _ in list(self._busy.values()):
            for a in [actor, *reserved]:
                ray.kill(a)
        for actor in self._idle:
            ray.kill(actor)
        self._idle.clear()
