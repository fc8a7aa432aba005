"""Ray Serve deployments for rewards. Ray lives in this module only; the scoring logic it serves
is plain Python (:mod:`.rules`, :mod:`.models`) and is tested without a cluster.

* ``RuleVerifier``: CPU deployment of the rule rewards, async, with ``@serve.batch``: batching
  amortises the per-request cost of Serve, which dominates for millisecond rules.
* ``ScalarRewardDeployment``: a sequence-classification reward model with ``@serve.batch``, so a
  burst of requests becomes a few forward passes, and ``@serve.multiplexed``, so one replica
  can hold several small reward heads (the model id is the checkpoint path). Fractional GPUs
  come through ``num_gpus`` in the config.

Both answer Python callers through a ``DeploymentHandle`` (``handle.score.remote(...)``) and
HTTP callers on ``POST /<route>``, where a bad payload gets 422 with the field and the rule.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tangram_core.telemetry import configure_telemetry
from tangram_reward.rules.request import RuleRequest, score_rules
from tangram_reward.tracing import Pending, batch_facts, scoring_span


class RewardDeploymentConfig(BaseModel):
    """One reward deployment, as declared in YAML or code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["rules", "scalar_rm"]
    model_path: str | None = Field(None, description="Checkpoint folder (scalar_rm only).")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(64, ge=1, description="At least the batch size.")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=8, description="Fractions share one GPU.")
    num_replicas: int = Field(1, ge=1)
    device: str = "cpu"
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the replicas, e.g. OTEL_* to export their scoring spans.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RewardDeploymentConfig:
        if self.kind == "scalar_rm" and not self.model_path:
            raise ValueError(f"deployment {self.name!r}: kind 'scalar_rm' needs model_path")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"deployment {self.name!r}: max_ongoing_requests ({self.max_ongoing_requests}) "
                f"must be >= max_batch_size ({self.max_batch_size}), or batches never fill"
            )
        return self


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]} for e in exc.errors()]


@serve.deployment
class RuleVerifier:
    def __init__(self, config: RewardDeploymentConfig) -> None:
        configure_telemetry(service_name=f"tangram-reward-{config.name}")
        self.config = config
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch
    async def score_batch(self, requests: list[Pending]) -> list[tuple[dict[str, Any], int, float]]:
        self.batch_sizes.append(len(requests))
        start = time.monotonic()
        return [(score_rules(p.request).model_dump(), len(requests), start) for p in requests]

    async def score(
        self, request: dict[str, Any], trace_context: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Validate, then score in a batch; bad input raises ValueError naming the field.

        The result carries ``meta``: the replica, its batch and the trace ids of this request's
        span (a child of ``trace_context``, the caller's W3C headers)."""
        try:
            req = RuleRequest.model_validate(request)
        except ValidationError as exc:
            raise ValueError(f"invalid rule request: {_errors(exc)}") from None
        with scoring_span(trace_context, self.config.name) as span:
            pending = Pending(req)
            result, size, start = await self.score_batch(pending)
            return dict(result, meta=batch_facts(span, pending, size, start))

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}

    def pid(self) -> int:
        """This replica's process id: tells replicas apart in tests and benchmarks."""
        return os.getpid()

    async def __call__(self, http: Request) -> JSONResponse:
        try:
            req = RuleRequest.model_validate(await http.json())
        except ValidationError as exc:
            return JSONResponse({"detail": _errors(exc)}, status_code=422)
        except ValueError:
            return JSONResponse({"detail": "body is not valid JSON"}, status_code=400)
        result, _, _ = await self.score_batch(Pending(req))
        return JSONResponse(result)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str
    response: str = Field(min_length=1)
    model_id: str | None = Field(None, description="Checkpoint path; the default if unset.")


@serve.deployment
class ScalarRewardDeployment:
    def __init__(self, config: RewardDeploymentConfig) -> None:
        configure_telemetry(service_name=f"tangram-reward-{config.name}")
        self.config = config
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.multiplexed(max_num_models_per_replica=4)  # reward heads held per replica
    async def get_model(self, model_id: str) -> Any:
        from tangram_reward.models import ScalarRewardModel, ScalarRewardModelConfig

        return ScalarRewardModel(
            ScalarRewardModelConfig(path=model_id, device=self.config.device)  # type: ignore[arg-type]
        )

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

    async def score(
        self,
        prompt: str,
        response: str,
        model_id: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> float:
        """The reward; the request's span (child of ``trace_context``) records its batch."""
        try:
            req = ScoreRequest(prompt=prompt, response=response, model_id=model_id)
        except ValidationError as exc:
            raise ValueError(f"invalid score request: {_errors(exc)}") from None
        with scoring_span(trace_context, self.config.name) as span:
            pending = Pending(req)
            value, size, start = await self.score_batch(pending)
            batch_facts(span, pending, size, start)
            return float(value)

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}

    async def __call__(self, http: Request) -> JSONResponse:
        try:
            req = ScoreRequest.model_validate(await http.json())
        except ValidationError as exc:
            return JSONResponse({"detail": _errors(exc)}, status_code=422)
        except ValueError:
            return JSONResponse({"detail": "body is not valid JSON"}, status_code=400)
        value, _, _ = await self.score_batch(Pending(req))
        return JSONResponse({"reward": value})


def build_app(config: RewardDeploymentConfig) -> Any:
    """The Serve application for one reward deployment, with its resources and replicas."""
    cls = RuleVerifier if config.kind == "rules" else ScalarRewardDeployment
    actor_options: dict[str, Any] = {"num_cpus": config.num_cpus}
    if config.env:
        actor_options["runtime_env"] = {"env_vars": dict(config.env)}
    if config.num_gpus:
        actor_options["num_gpus"] = config.num_gpus
    return cls.options(  # type: ignore[attr-defined]
        name=config.name,
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(config)


def scale_deployment(app: str, deployment: str, replicas: int) -> None:
    """Set a deployment's replica count through Serve's external-scaling API.

    This is the controller call behind Serve's REST route
    ``POST /api/v1/applications/{app}/deployments/{dep}/scale``; calling it directly works
    without the dashboard. The application must be deployed with
    ``external_scaler_enabled=True``; otherwise Serve refuses with a message that says so.
    """
    if replicas < 0:
        raise ValueError(f"replicas ({replicas}) must be >= 0")
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(deployment, app), replicas))


def running_replicas(app: str, deployment: str) -> int:
    """Replicas of ``deployment`` in state RUNNING, from ``serve.status()``."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    counts = status.deployments[deployment].replica_states
    return int(counts.get("RUNNING", 0))


async def wait_for_replicas(app: str, deployment: str, replicas: int, timeout_s: float) -> float:
    """Wait until exactly ``replicas`` are RUNNING; returns the seconds it took."""
    import asyncio
    import time

    t0 = time.monotonic()
    while running_replicas(app, deployment) != replicas:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(
                f"{app}/{deployment}: {running_replicas(app, deployment)} replicas running "
                f"after {timeout_s:.0f}s, wanted {replicas}"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - t0
