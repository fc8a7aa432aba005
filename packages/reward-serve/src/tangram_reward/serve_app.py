"""Ray Serve deployments for rewards. Ray lives in this module only; the scoring logic it serves
is plain Python (:mod:`.rules`, :mod:`.models`) and is tested without a cluster.

* ``RuleVerifier``: CPU deployment of the rule rewards, async, with ``@serve.batch``: batching
  amortises the per-request cost of Serve, which dominates for millisecond rules.
* ``ScalarRewardDeployment``: a sequence-classification reward model with ``@serve.batch``, so a
  burst of requests becomes a few forward passes, and ``@serve.multiplexed``, so one replica
  can hold several small reward heads (the model id is the checkpoint path). Fractional GPUs
  come through ``num_gpus`` in the config.
* ``JudgeDeployment``: a generative judge (:mod:`.models.judge`): a causal LM on vLLM (or
  transformers) reads a rubric prompt and writes a score; ``@serve.batch`` makes each batch one
  ``generate`` call. A reply with no usable score raises ``JudgeParseError`` (never a 0).

All answer through a ``DeploymentHandle`` (``handle.score.remote(...)``): the reward manager
calls them so, and HTTP callers reach them through :mod:`.gateway`, which validates, guards and
forwards (Serve's own HTTP proxy is not used; see that module for why). Every result carries
``meta``: the deployment, the model version and the request id that produced it, plus its
replica, batch and trace ids. Past ``max_queued_requests`` waiting requests a handle call
raises ``BackPressureError`` at once instead of queueing without bound.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Protocol, cast

from pydantic import ValidationError
from ray import serve

from tangram_core import semconv
from tangram_core.telemetry import configure_telemetry
from tangram_reward import __version__
from tangram_reward.deployment_config import RewardDeploymentConfig
from tangram_reward.rules.request import RuleRequest, score_rules
from tangram_reward.schemas import ScoreRequest, error_text, validation_errors
from tangram_reward.tracing import (
    AttributedReward,
    Pending,
    attribution,
    batch_facts,
    scoring_span,
)


class _BatchControl(Protocol):
    """The setters ``@serve.batch`` puts on the method it wraps (Ray types it as a plain
    callable, so mypy cannot see them)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...
    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


def configure_batching(method: object, config: RewardDeploymentConfig) -> None:
    """Apply the deployment's batch size and wait to a ``@serve.batch`` method."""
    control = cast(_BatchControl, method)
    control.set_max_batch_size(config.max_batch_size)
    control.set_batch_wait_timeout_s(config.batch_wait_timeout_s)


RULES_VERSION = f"rules-{__version__}"


@serve.deployment
class RuleVerifier:
    def __init__(self, config: RewardDeploymentConfig) -> None:
        configure_telemetry(service_name=f"tangram-reward-{config.name}", serve_metrics=False)
        self.config = config
        configure_batching(self.score_batch, config)
        self.batch_sizes: list[int] = []

    @serve.batch
    async def score_batch(self, requests: list[Pending]) -> list[tuple[dict[str, Any], int, float]]:
        self.batch_sizes.append(len(requests))
        start = time.monotonic()
        return [(score_rules(p.request).model_dump(), len(requests), start) for p in requests]

    async def _score(
        self, req: RuleRequest, trace_context: dict[str, str] | None, request_id: str | None
    ) -> dict[str, Any]:
        who = attribution(self.config.name, RULES_VERSION, request_id)
        with scoring_span(trace_context, self.config.name, who) as span:
            pending = Pending(req)
            result, size, start = await self.score_batch(pending)
            return dict(result, meta=batch_facts(span, pending, size, start, who))

    async def score(
        self,
        request: dict[str, Any],
        trace_context: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Validate, then score in a batch; bad input raises ValueError naming the field.

        The result carries ``meta``: the deployment, model version and request id (the
        caller's ``request_id``, e.g. an HTTP ``X-Request-ID``, else Serve's), the replica, its
        batch and the trace ids of this request's span (a child of ``trace_context``, the
        caller's W3C headers)."""
        try:
            req = RuleRequest.model_validate(request)
        except ValidationError as exc:
            raise ValueError(f"invalid rule request: {validation_errors(exc)}") from None
        return await self._score(req, trace_context, request_id)

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}

    def pid(self) -> int:
        """This replica's process id: tells replicas apart in tests and benchmarks."""
        return os.getpid()


@functools.lru_cache(maxsize=64)
def checkpoint_version(path: str) -> str:
    """A reward model's version: its folder name and a digest of its files' names, sizes and
    modification times (cheap: no weights are read), so a retrained head gets a new version."""
    root = Path(path)
    digest = hashlib.sha256()
    if root.is_dir():
        for f in sorted(root.rglob("*")):
            if f.is_file():
                st = f.stat()
                digest.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{root.name}@{digest.hexdigest()[:12]}"


@serve.deployment
class ScalarRewardDeployment:
    def __init__(self, config: RewardDeploymentConfig) -> None:
        configure_telemetry(service_name=f"tangram-reward-{config.name}", serve_metrics=False)
        self.config = config
        configure_batching(self.score_batch, config)
        self.batch_sizes: list[int] = []

    # Reward heads held per replica. Ray 2.60 leaves serve.multiplexed untyped.
    @serve.multiplexed(max_num_models_per_replica=4)  # type: ignore[untyped-decorator]
    async def get_model(self, model_id: str) -> Any:
        from tangram_reward.models import ScalarRewardModel

        return ScalarRewardModel(self._checkpoint(model_id))

    def _checkpoint(self, model_id: str | None) -> Any:
        """The checkpoint's config; a request's ``model_id`` that is no reward model raises
        ValueError naming the deployment and the path (the HTTP 422 text)."""
        try:
            return self.config.scalar_rm_config(model_id)
        except ValidationError as exc:
            raise ValueError(f"deployment {self.config.name!r}: {error_text(exc)}") from None

    @serve.batch
    async def score_batch(self, pending: list[Pending]) -> list[tuple[float, int, float]]:
        self.batch_sizes.append(len(pending))
        start = time.monotonic()
        requests: list[ScoreRequest] = [p.request for p in pending]
        out: list[float] = [0.0] * len(requests)
        by_model: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_model.setdefault(r.model_id or self.config.model_path or "", []).append(i)
        for model_id, idx in by_model.items():
            model = await self.get_model(model_id)
            scores = model.score(
                [requests[i].prompt for i in idx], [requests[i].response for i in idx]
            )
            for i, s in zip(idx, scores, strict=True):
                out[i] = s
        return [(value, len(requests), start) for value in out]

    async def _score(
        self, req: ScoreRequest, trace_context: dict[str, str] | None, request_id: str | None
    ) -> AttributedReward:
        model = req.model_id or self.config.model_path or ""
        who = attribution(self.config.name, checkpoint_version(model), request_id)
        with scoring_span(trace_context, self.config.name, who) as span:
            pending = Pending(req)
            value, size, start = await self.score_batch(pending)
            return AttributedReward(value, batch_facts(span, pending, size, start, who))

    async def score(
        self,
        prompt: str,
        response: str,
        model_id: str | None = None,
        trace_context: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> float:
        """The reward, as an :class:`AttributedReward` (a float with ``meta``); the request's
        span (child of ``trace_context``) records its batch."""
        try:
            req = ScoreRequest(prompt=prompt, response=response, model_id=model_id)
        except ValidationError as exc:
            raise ValueError(f"invalid score request: {validation_errors(exc)}") from None
        if req.model_id is not None:  # here, not in the batch: it would fail its neighbours
            self._checkpoint(req.model_id)
        return await self._score(req, trace_context, request_id)

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}


# vLLM's engine core runs inside the judge's replica process rather than in child processes:
# spawning them from a Ray actor took over 4 minutes on a loaded 2-core machine (in process:
# about 30 s), and a replica killed with SIGKILL would leave them behind. One replica serves
# one engine, so nothing is lost.
# A deployment's ``env`` can set it back to "1".
JUDGE_REPLICA_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@serve.deployment
class JudgeDeployment:
    """A generative judge: one engine per replica, one ``generate`` call per batch.

    ``generate`` runs inline on the replica's event loop: requests that arrive meanwhile wait
    and form the next batch, and the engine is never called from two places at once
    (``@serve.batch`` runs one batch at a time by default)."""

    def __init__(self, config: RewardDeploymentConfig) -> None:
        from tangram_reward.models.judge import Judge

        configure_telemetry(service_name=f"tangram-reward-{config.name}", serve_metrics=False)
        self.config = config
        judge_config = config.judge_config()
        self.judge = Judge(judge_config)
        self.version = checkpoint_version(str(judge_config.path))
        configure_batching(self.judge_batch, config)
        self.batch_sizes: list[int] = []

    @serve.batch
    async def judge_batch(self, pending: list[Pending]) -> list[tuple[Any, int, float]]:
        self.batch_sizes.append(len(pending))
        start = time.monotonic()
        replies = self.judge.generate([p.request for p in pending])
        return [(reply, len(pending), start) for reply in replies]

    async def _score(
        self, req: ScoreRequest, trace_context: dict[str, str] | None, request_id: str | None
    ) -> AttributedReward:
        if req.model_id is not None and req.model_id != self.config.model_path:
            raise ValueError(
                f"judge {self.config.name!r} serves {self.config.model_path!r}, not "
                f"{req.model_id!r}; deploy another judge for that model"
            )
        who = attribution(self.config.name, self.version, request_id)
        with scoring_span(trace_context, self.config.name, who) as span:
            ids = self.judge.encode(req.prompt, req.response)
            span.set_attributes(self.judge.span_attributes(len(ids)))
            pending = Pending(ids)
            reply, size, start = await self.judge_batch(pending)
            meta = batch_facts(span, pending, size, start, who)
            span.set_attribute(semconv.GEN_AI_USAGE_OUTPUT_TOKENS, reply.output_tokens)
            verdict = self.judge.verdict(reply.text)
            if verdict.score is None:
                span.set_attribute(semconv.ERROR_TYPE, "JudgeParseError")
            score = verdict.checked()  # raises JudgeParseError with the judge's text
            meta["judge"] = {"raw_score": score.raw, "text": verdict.text}
            return AttributedReward(score.reward, meta)

    async def score(
        self,
        prompt: str,
        response: str,
        model_id: str | None = None,
        trace_context: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> float:
        """The judge's score normalised to [0, 1], as an :class:`AttributedReward` whose
        ``meta["judge"]`` holds the raw score and the judge's text. A reply with no score in
        range raises :class:`JudgeParseError` (``.text`` is the reply); bad input ValueError."""
        try:
            req = ScoreRequest(prompt=prompt, response=response, model_id=model_id)
        except ValidationError as exc:
            raise ValueError(f"invalid score request: {validation_errors(exc)}") from None
        return await self._score(req, trace_context, request_id)

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}

    def __del__(self) -> None:
        judge = getattr(self, "judge", None)
        if judge is not None:
            judge.close()


def build_app(config: RewardDeploymentConfig) -> Any:
    """The Serve application for one reward deployment, with its resources and replicas.

    It has no HTTP route of its own: handles reach it (guarded by Ray's token
    authentication), and HTTP clients go through :mod:`tangram_reward.gateway`."""
    deployments: dict[str, Any] = {
        "rules": RuleVerifier,
        "scalar_rm": ScalarRewardDeployment,
        "judge": JudgeDeployment,
    }
    cls = deployments[config.kind]
    actor_options: dict[str, Any] = {"num_cpus": config.num_cpus}
    env = dict(config.env)
    if config.kind == "judge":
        env = {**JUDGE_REPLICA_ENV, **env}
    if env:
        actor_options["runtime_env"] = {"env_vars": env}
    if config.num_gpus:
        actor_options["num_gpus"] = config.num_gpus
    return cls.options(
        name=config.name,
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options=actor_options,
    ).bind(config)
