"""Rollout engines on a cluster: each a vLLM engine in a Ray actor, and the pool that spreads a
step's groups over them and survives the loss of all but one.

Dispatch is per GRPO group: a group's requests go to one engine (its members share a prompt,
so vLLM's prefix cache serves them once) and stay on it for the step's later turns. A new group
goes to the engine with the fewest requests in the current call, then the fewest groups this
step. Every request carries its own seed, so a group samples the same tokens on any engine.

Failover (synchronous runs): when an engine's actor dies, the requests it held are sent again
to the engines still alive, the loss is counted (``engines_lost``, ``groups_redispatched``)
and the run goes on; only when no engine is left does the step fail, naming every engine and
how it ended. New weights reach every engine through Ray's object store: trainer rank 0 puts
the state dict once, and each engine pulls it to its own node.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from r1_train.config import RolloutConfig
from r1_train.remote_trace import ENGINE, current_carrier, remote_span, where
from r1_train.rollout import Generation, GenRequest

SPAN_ENGINE_GENERATE = "tangram.rollout.engine.generate"
SPAN_ENGINE_SYNC = "tangram.rollout.engine.weight_sync"


class EnginesLost(RuntimeError):
    """No rollout engine is left: the step cannot be generated."""


class EngineWorker:
    """One vLLM engine in a Ray actor (created by :func:`start_engines`)."""

    def __init__(
        self, index: int, model_path: str, cfg: RolloutConfig, seed: int, dtype: str
    ) -> None:
        from r1_train.reaper import start_reaper
        from r1_train.rollout import VLLMEngine
        from tangram_core.telemetry import configure_telemetry

        # vLLM's EngineCore outlives this actor's process when it is killed (a node lost, a
        # `ray.kill`): the watchdog stops it and frees its shared memory
        start_reaper()
        configure_telemetry(
            service_name="r1-train", resource_attributes={"tangram.role": "rollout", ENGINE: index}
        )
        self.index = index
        self.engine = VLLMEngine(Path(model_path), cfg, seed=seed, dtype=dtype)

    def where(self) -> dict[str, Any]:
        return {"engine": self.index, **where()}

    def generate(
        self, requests: list[GenRequest], carrier: dict[str, str]
    ) -> tuple[list[Generation], dict[str, Any]]:
        with remote_span(
            SPAN_ENGINE_GENERATE, carrier, {ENGINE: self.index, "tangram.requests": len(requests)}
        ) as span:
            return self.engine.generate(requests), span

    def sync_weights(
        self, state: dict[str, Any] | bytes, version: int, carrier: dict[str, str]
    ) -> tuple[float, float, dict[str, Any]]:
        """Load ``state`` (resolved by Ray from the object store on this node: a state dict,
        or a safetensors file's bytes); returns the engine's fingerprint, the seconds the load
        took here, and the span's ids."""
        t0 = time.perf_counter()
        with remote_span(SPAN_ENGINE_SYNC, carrier, {ENGINE: self.index}) as span:
            fingerprint = self.engine.sync_weights(state, version)
        return fingerprint, time.perf_counter() - t0, span

    # ---- asynchronous mode: the engine generates while the trainer trains -----------------

    def start_stream(self, version: int, on_update: str, recompute_kv: bool) -> None:
        """Drive this engine as :class:`~r1_train.streaming.StreamingEngine` (run.mode async)."""
        from r1_train.streaming import StreamingEngine

        self.stream = StreamingEngine(
            self.engine,
            version=version,
            on_update=on_update,  # type: ignore[arg-type]  # validated by AsyncConfig
            recompute_kv=recompute_kv,
        )

    async def stream_generate(self, request: GenRequest, carrier: dict[str, str]) -> Generation:
        with remote_span(SPAN_ENGINE_GENERATE, carrier, {ENGINE: self.index}):
            return await self.stream.generate(request)

    async def stream_update(
        self, state: dict[str, Any] | bytes, version: int, carrier: dict[str, str]
    ) -> float:
        """New weights between two decode steps (``state`` pulled from the object store)."""
        with remote_span(SPAN_ENGINE_SYNC, carrier, {ENGINE: self.index}):
            return await self.stream.update_weights(state, version)

    def stream_stats(self) -> tuple[float, int]:
        """Seconds the engine had work, and requests aborted by updates (on_update drop)."""
        return self.stream.busy_s, self.stream.dropped

    def stream_stop(self) -> None:
        self.stream.stop()

    def close(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.stop()
        self.engine.close()


class RemoteStream:
    """The pool's engines as one streaming engine, for :class:`~r1_train.async_trainer.AsyncRun`.

    Each engine runs its own :class:`~r1_train.streaming.StreamingEngine` in its actor; a
    request goes to its group's engine (a new group to the engine with the fewest requests in
    flight), and new weights go to every engine at once, each landing between two of its decode
    steps. ``busy_s`` is the engines' mean busy time, so the run's idle fraction is the
    engines' average. A dead engine fails the run (``RolloutsLost``): in this mode requests
    are in flight across versions, and re-dispatching them would mix their policy versions.
    """

    def __init__(
        self, pool: EnginePool, *, version: int, on_update: str, recompute_kv: bool
    ) -> None:
        import ray

        self.pool, self.version, self.model_name = pool, version, pool.model_name
        ray.get(
            [
                pool.workers[e].start_stream.remote(version, on_update, recompute_kv)
                for e in pool.alive
            ]
        )
        self._in_flight: Counter[int] = Counter()
        self._sticky: dict[Any, int] = {}

    def _engine_for(self, request: GenRequest) -> int:
        key = request.group if request.group is not None else ("seed", request.seed)
        engine = self._sticky.get(key)
        if engine is None:
            engine = min(self.pool.alive, key=lambda e: (self._in_flight[e], e))
            self._sticky[key] = engine
            self.pool.count_group(engine)
        return engine

    async def generate(self, request: GenRequest) -> Generation:
        engine = self._engine_for(request)
        self._in_flight[engine] += 1
        try:
            gen: Generation = await self.pool.workers[engine].stream_generate.remote(
                request, current_carrier()
            )
            return gen
        finally:
            self._in_flight[engine] -= 1

    async def update_weights(self, state: Any, version: int) -> float:
        import asyncio

        import ray

        ref = state if isinstance(state, ray.ObjectRef) else ray.put(state)
        carrier = current_carrier()
        calls = [
            self.pool.workers[e].stream_update.remote(ref, version, carrier)
            for e in self.pool.alive
        ]
        prints = await asyncio.gather(*calls)
        if len({round(p, 6) for p in prints}) > 1:
            raise RuntimeError(f"the engines disagree on the weights they loaded: {prints}")
        self.version = version
        self._sticky.clear()  # groups launched from now on may go anywhere
        return float(prints[0])

    def _stats(self) -> list[tuple[float, int]]:
        import ray

        return list(ray.get([self.pool.workers[e].stream_stats.remote() for e in self.pool.alive]))

    @property
    def busy_s(self) -> float:
        stats = self._stats()
        return sum(b for b, _ in stats) / len(stats) if stats else 0.0

    @property
    def dropped(self) -> int:
        return sum(d for _, d in self._stats())

    def stop(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # an engine already gone has nothing to stop
            ray.get([self.pool.workers[e].stream_stop.remote() for e in self.pool.alive])


class EnginePool:
    """The cluster's engines behind the one-engine interface the agent loop uses."""

    def __init__(self, workers: list[Any], places: list[dict[str, Any]], model_name: str) -> None:
        self.workers = list(workers)
        self.places = places
        self.model_name = model_name
        self.alive = list(range(len(workers)))
        self.ended: dict[int, str] = {}  # engine -> how it was lost
        self._sticky: dict[Any, int] = {}  # group -> engine, for the current step
        self._step_groups: Counter[int] = Counter()
        self.lost_since_take = 0
        self.redispatched_since_take = 0
        self.spans: list[dict[str, Any]] = []
        self.last_sync_s: float = 0.0

    def _place(self, requests: list[GenRequest]) -> dict[int, list[int]]:
        """Request indices per engine: groups whole, sticky, new ones to the least loaded."""
        plan: dict[int, list[int]] = {e: [] for e in self.alive}
        for i, req in enumerate(requests):
            key: Any = req.group if req.group is not None else ("request", i, req.seed)
            engine = self._sticky.get(key)
            if engine not in plan:
                engine = min(self.alive, key=lambda e: (len(plan[e]), self._step_groups[e], e))
                self._sticky[key] = engine
                self._step_groups[engine] += 1
            plan[engine].append(i)
        return {e: idx for e, idx in plan.items() if idx}

    def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """Every request's generation, in order. Calls go to all engines at once and are
        collected as they finish; the requests of an engine that died are sent at once to the
        engines left (joining their batches), not after the others' calls return."""
        import ray

        out: list[Generation | None] = [None] * len(requests)
        carrier = current_carrier()
        self.spans = []
        pending: dict[Any, tuple[int, list[int]]] = {}

        def dispatch(indices: list[int]) -> None:
            if not self.alive:
                raise EnginesLost(
                    f"every rollout engine is gone ({self.diagnose()}); "
                    f"{len(indices)} request(s) of the step could not be generated"
                )
            sub = [requests[i] for i in indices]
            for engine, idx in self._place(sub).items():
                ref = self.workers[engine].generate.remote([sub[j] for j in idx], carrier)
                pending[ref] = (engine, [indices[j] for j in idx])

        dispatch(list(range(len(requests))))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            engine, indices = pending.pop(done[0])
            try:
                gens, span = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                self._lose(engine, exc)
                self.redispatched_since_take += len({requests[i].group for i in indices})
                dispatch(indices)
                continue
            self.spans.append(span)
            for i, gen in zip(indices, gens, strict=True):
                out[i] = gen
        return [g for g in out if g is not None]

    def _lose(self, engine: int, exc: BaseException) -> None:
        if engine in self.alive:
            self.alive.remove(engine)
            place = self.places[engine]
            lines = str(exc).strip().splitlines()
            self.ended[engine] = (
                f"engine {engine} on node {str(place.get('node_id', '?'))[:12]} "
                f"({place.get('ip', '?')}, pid {place.get('pid', '?')}): "
                f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
            )
            self.lost_since_take += 1
            self._sticky = {k: e for k, e in self._sticky.items() if e != engine}

    def sync_weights(self, state: Any, version: int) -> float:
        """``state``: a dict, or a Ray object ref to one (what the trainer ranks return)."""
        import ray

        carrier = current_carrier()
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(state)
        t0 = time.perf_counter()
        calls = {self.workers[e].sync_weights.remote(ref, version, carrier): e for e in self.alive}
        prints: dict[int, float] = {}
        self.spans = []
        for call, engine in calls.items():
            try:
                fingerprint, _, span = ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                self._lose(engine, exc)
                continue
            prints[engine] = fingerprint
            self.spans.append(span)
        self.last_sync_s = time.perf_counter() - t0
        if not prints:
            raise EnginesLost(f"no rollout engine took the new weights ({self.diagnose()})")
        if len({round(p, 6) for p in prints.values()}) > 1:
            raise RuntimeError(f"the engines disagree on the weights they loaded: {prints}")
        return next(iter(prints.values()))

    def count_group(self, engine: int) -> None:
        """A group placed on ``engine`` by another dispatcher (the asynchronous stream)."""
        self._step_groups[engine] += 1

    def take_stats(self) -> dict[str, Any]:
        """The step's dispatch and failover figures for the metrics row; resets the counters
        and the step's group placement (the next step's groups may go anywhere)."""
        counts = [self._step_groups.get(e, 0) for e in self.alive] or [0]
        self._sticky.clear()
        self._step_groups.clear()
        stats = {
            "engines_alive": len(self.alive),
            "engines_lost": self.lost_since_take,
            "groups_redispatched": self.redispatched_since_take,
            "dispatch_balance": max(counts) / min(counts) if min(counts) else None,
        }
        self.lost_since_take = self.redispatched_since_take = 0
        return stats

    def diagnose(self) -> str | None:
        return "; ".join(self.ended.values()) or None

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # an engine that died meanwhile has nothing to close
            ray.get([self.workers[e].close.remote() for e in self.alive], timeout=60)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(worker)
