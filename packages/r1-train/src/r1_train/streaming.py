"""vLLM driven one decode step at a time, so that new weights can land between decode steps.

Why: in asynchronous training the trainer finishes an update while trajectories are still being
generated. Waiting for the engine to drain (the synchronous schedule) idles it on the long tail;
this engine takes the new weights at the next decode-step boundary instead. The steps are
vLLM's own API for RL: the engine core's scheduler is paused (``pause_scheduler`` in ``keep``
mode, so requests stay), the weights are reloaded through the worker extension, the engine's
*weight version* label is set (vLLM then reports, per finished request, which output tokens each
version sampled), and the scheduler resumes. What happens to requests in flight is configurable:

* ``continue``: they go on under the new weights (partial rollout). With ``recompute_kv`` their
  KV cache is dropped and recomputed by the new weights at the next step; without it, the old
  keys and values stay (cheaper, as PipelineRL does; the prefix cache cannot be reset while they
  run, so new requests may also hit old-weight prefixes).
* ``drop``: they are aborted; :meth:`StreamingEngine.generate` raises :class:`RolloutDropped` and
  the caller generates the trajectory again.

A single driver thread owns the vLLM engine (its methods are not thread-safe); coroutines hand
it requests and updates and await futures it resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from r1_train.rollout import (
    Generation,
    GenRequest,
    VLLMEngine,
    sampled_logprobs,
    sampling_params,
)


class RolloutDropped(RuntimeError):
    """The request was aborted by a weight update (``on_update='drop'``); generate it again."""


@dataclass
class _Request:
    request: GenRequest
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    submitted_version: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


@dataclass
class _Update:
    state_dict: dict[str, Any] | bytes  # bytes: a serialised safetensors file
    version: int
    future: asyncio.Future[float]
    loop: asyncio.AbstractEventLoop


def _settle(
    future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    value: Any = None,
    error: BaseException | None = None,
) -> None:
    """Settle ``future`` on its loop from the driver thread; a loop that has closed has nobody
    left waiting (the caller's ``asyncio.run`` ended), so there is nothing to tell."""
    if future.done() or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # closed between the check and the call
        loop.call_soon_threadsafe(_settle, future, value, error)


def token_versions(spans: Any, n: int, fallback: int) -> list[int]:
    """Expand vLLM's ``WeightVersionSpan`` list into one policy version per output token."""
    versions = [fallback] * n
    for span in spans or ():
        for i in range(max(0, span.start), min(n, span.end)):
            versions[i] = int(span.version)
    return versions


class StreamingEngine:
    """An in-process vLLM engine that generates while the trainer trains.

    ``generate`` is a coroutine per request (the engine batches whatever is in flight);
    ``update_weights`` lands new weights between two decode steps. ``busy_s`` accumulates the
    wall time during which the engine had work, for the idle fraction the benchmark reports.
    """

    def __init__(
        self,
        engine: VLLMEngine,
        *,
        version: int,
        on_update: Literal["continue", "drop"] = "continue",
        recompute_kv: bool = True,
    ) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.on_update, self.recompute_kv = on_update, recompute_kv
        self._core = engine.llm.llm_engine
        if not hasattr(self._core, "set_weight_version"):
            raise RuntimeError(
                "run.mode 'async' needs a vLLM with weight-version labels and scheduler pause "
                "(vLLM >= 0.32); this one has neither"
            )
        self.version = version
        self._core.set_weight_version(str(version))
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._inbox: list[_Request] = []
        self._updates: list[_Update] = []
        self._live: dict[str, _Request] = {}
        self._closed = False
        self._failure: BaseException | None = None
        self.busy_s = 0.0
        self.occupancy_s = 0.0  # sum over busy time of the sequences in flight
        self.dropped = 0  # requests aborted by updates (on_update='drop')
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._drive, name="r1-train-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._watch, name="r1-train-engine-watch", daemon=True
        )
        self._watchdog.start()

    # ---- called from the event loop -------------------------------------------------------

    async def generate(self, request: GenRequest) -> Generation:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Generation] = loop.create_future()
        with self._cv:
            self._check_open()
            self._inbox.append(_Request(request, future, loop, self.version))
            self._cv.notify()
        return await future

    async def update_weights(self, state_dict: dict[str, Any] | bytes, version: int) -> float:
        """Hand new weights to the engine; returns the fingerprint it computed after loading."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        with self._cv:
            self._check_open()
            self._updates.append(_Update(state_dict, version, future, loop))
            self._cv.notify()
        return await future

    def idle_fraction(self, since: float | None = None, busy_before: float = 0.0) -> float:
        """Fraction of wall time (since ``since``) in which the engine had nothing to do."""
        start = self.started if since is None else since
        wall = time.perf_counter() - start
        return max(0.0, 1.0 - (self.busy_s - busy_before) / wall) if wall > 0 else 0.0

    def stop(self) -> None:
        """Stop driving the engine; requests still in flight are aborted. The wrapped
        :class:`VLLMEngine` stays usable (its blocking ``generate`` works again)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def close(self) -> None:
        self.stop()
        self.engine.close()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the rollout engine failed: {self._failure!r}") from self._failure
        if self._closed:
            raise RuntimeError("the rollout engine is closed")

    # ---- the driver thread ---------------------------------------------------------------

    def _drive(self) -> None:
        # taken from the shared lists but maybe not yet handed to vLLM when something fails:
        # they are settled in ``finally`` too (settling a done future is a no-op)
        inbox: list[_Request] = []
        updates: list[_Update] = []
        try:
            while True:
                with self._cv:
                    while not (self._closed or self._inbox or self._updates or self._live):
                        self._cv.wait()
                    if self._closed:
                        break
                    inbox, self._inbox = self._inbox, []
                    updates, self._updates = self._updates, []
                for req in inbox:
                    self._add(req)
                for update in updates:
                    self._apply(update)
                if self._live and self._core.has_unfinished_requests():
                    t0 = time.perf_counter()
                    in_flight = len(self._live)
                    outputs = self._core.step()
                    dt = time.perf_counter() - t0
                    self.busy_s += dt
                    self.occupancy_s += dt * in_flight
                    for out in outputs:
                        self._absorb(out)
        except BaseException as exc:  # the engine is broken: every waiter learns why
            self._failure = exc
        finally:
            if self._failure is None and self._live:  # leave vLLM empty for its next user
                self._core.abort_request(list(self._live))
            error = self._failure or RuntimeError("the rollout engine is closed")
            with self._cv:
                pending = inbox + self._inbox + list(self._live.values())
                unapplied = updates + self._updates
                self._inbox, self._updates, self._live = [], [], {}
            for req in pending:
                _post(req.loop, req.future, None, error)
            for upd in unapplied:
                _post(upd.loop, upd.future, None, error)

    def _watch(self, period_s: float = 0.5) -> None:
        """Unblock the driver if the engine-core process dies.

        vLLM's monitor marks the client dead, but its blocking ``get_output`` (inside ``step``)
        would wait for ever; vLLM's async client gets an ``EngineDeadError`` queued for this, so
        the same is done for the sync client, and the driver fails every waiter."""
        from vllm.v1.engine.exceptions import EngineDeadError

        client: Any = self._core.engine_core
        resources = getattr(client, "resources", None)
        queue = getattr(client, "outputs_queue", None)
        if resources is None or queue is None:  # in-process engine core: nothing to watch
            return
        while not self._closed and self._failure is None:
            if getattr(resources, "engine_dead", False):
                queue.put_nowait(EngineDeadError())
                return
            time.sleep(period_s)

    def _add(self, req: _Request) -> None:
        from vllm.inputs import TokensPrompt

        rid = f"r1-{next(self._ids)}"
        req.submitted_version = self.version
        self._live[rid] = req
        self._core.add_request(
            rid,
            TokensPrompt(prompt_token_ids=req.request.prompt_ids),
            sampling_params(self.engine.cfg, req.request, stream=True),
        )

    def _absorb(self, out: Any) -> None:
        req = self._live.get(out.request_id)
        if req is None:  # aborted by an update: its late deltas are dropped
            return
        c = out.outputs[0]
        ids = list(c.token_ids)
        req.token_ids += ids
        req.logprobs += sampled_logprobs(ids, c.logprobs)
        req.text.append(c.text)
        if not out.finished:
            return
        del self._live[out.request_id]
        n = len(req.token_ids)
        gen = Generation(
            req.token_ids,
            req.logprobs,
            "length" if c.finish_reason == "length" else "stop",
            "".join(req.text),
            token_versions(c.weight_versions, n, req.submitted_version),
        )
        _post(req.loop, req.future, gen)

    def _utility(self, method: str, *args: Any) -> Any:
        """Call an engine-core method: through the RPC of the engine-core process (vLLM's
        default), or directly when the core runs in this process (multiprocessing off)."""
        client: Any = self._core.engine_core
        call = getattr(client, "call_utility", None)
        if callable(call):
            return call(method, *args)
        return getattr(client.engine_core, method)(*args)

    def _apply(self, update: _Update) -> None:
        """New weights between two decode steps (see the module docstring)."""
        self._utility("pause_scheduler", "keep", False)
        try:
            if self.on_update == "drop" and self._live:
                aborted = list(self._live)
                self._core.abort_request(aborted)
                for rid in aborted:
                    req = self._live.pop(rid)
                    self.dropped += 1
                    _post(
                        req.loop,
                        req.future,
                        None,
                        RolloutDropped(f"request {rid} aborted by the update to v{update.version}"),
                    )
            with self.engine.weight_drop.staged(update.state_dict) as weights_dir:
                (fingerprint,) = self.engine.llm.collective_rpc(
                    "load_weights_from", args=(weights_dir,)
                )
            self._core.set_weight_version(str(update.version))
            self.version = update.version
            # KV of requests in flight: recomputed by the new weights (recompute_kv) or kept
            self._utility("reset_prefix_cache", self.recompute_kv, False)
        except BaseException as exc:
            _post(update.loop, update.future, None, exc)
            raise
        finally:
            self._utility("resume_scheduler")
        _post(update.loop, update.future, float(fingerprint))
