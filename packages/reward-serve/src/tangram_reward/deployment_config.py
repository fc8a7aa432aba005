"""One reward deployment's configuration: what ``rewards.yaml``, the Serve application builder
and code declare. Plain pydantic, no Ray: ``tangram-reward check`` validates a file on a
machine without the ``[serve]`` extra, and a bad file fails before any cluster starts.

A checkpoint (``model_path`` of a ``scalar_rm`` or ``judge``) is checked here, on the machine
that reads the config: a path that does not exist, has no ``config.json`` or holds the wrong
kind of model fails validation naming the deployment and the path, instead of passing as
healthy and failing each request later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tangram_core.http.guard import GuardConfig
from tangram_reward.models.judge import JudgeConfig, JudgeSpec
from tangram_reward.models.scalar_rm import ScalarRewardModelConfig
from tangram_reward.schemas import error_text, first_error, validation_errors

__all__ = ["RewardDeploymentConfig", "error_text", "first_error", "validation_errors"]


def _default_http() -> GuardConfig:
    return GuardConfig(max_body_bytes=1 << 20)


class RewardDeploymentConfig(BaseModel):
    """One reward deployment, as declared in YAML or code."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["rules", "scalar_rm", "judge"]
    model_path: str | None = Field(None, description="Checkpoint folder (scalar_rm, judge).")
    judge: JudgeSpec | None = Field(
        None, description="Rubric, score range and sampling of a 'judge'; defaults if unset."
    )
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(64, ge=1, description="At least the batch size.")
    max_queued_requests: int = Field(
        128,
        ge=1,
        description="Requests waiting for a replica; past it Serve answers 503 (HTTP) or "
        "raises BackPressureError (handles) at once instead of queueing without bound.",
    )
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=8, description="Fractions share one GPU.")
    num_replicas: int = Field(1, ge=1)
    device: str = "cpu"
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the replicas, e.g. OTEL_* to export their scoring spans.",
    )
    http: GuardConfig = Field(
        default_factory=_default_http,
        description="HTTP limits of this deployment's route on the gateway (body size, "
        "per-client rate and concurrency, requests in flight and queued).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RewardDeploymentConfig:
        if self.kind in ("scalar_rm", "judge") and not self.model_path:
            raise ValueError(f"deployment {self.name!r}: kind {self.kind!r} needs model_path")
        if self.judge is not None and self.kind != "judge":
            raise ValueError(
                f"deployment {self.name!r}: a 'judge' block needs kind 'judge', not {self.kind!r}"
            )
        # A missing or wrong checkpoint fails here, before Ray starts.
        try:
            if self.kind == "judge":
                self.judge_config()
            elif self.kind == "scalar_rm":
                self.scalar_rm_config()
        except ValidationError as exc:
            raise ValueError(f"deployment {self.name!r}: {error_text(exc)}") from None
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"deployment {self.name!r}: max_ongoing_requests ({self.max_ongoing_requests}) "
                f"must be >= max_batch_size ({self.max_batch_size}), or batches never fill"
            )
        return self

    def judge_config(self) -> JudgeConfig:
        """The judge's full config: the ``judge`` block with this deployment's checkpoint."""
        spec = self.judge or JudgeSpec()
        fields = {**spec.model_dump(), "path": self.model_path, "device": self.device}
        return JudgeConfig.model_validate(fields)

    def scalar_rm_config(self, model_id: str | None = None) -> ScalarRewardModelConfig:
        """The reward model's config for ``model_id`` (a checkpoint path a request names), or
        this deployment's own checkpoint."""
        return ScalarRewardModelConfig.model_validate(
            {"path": model_id or self.model_path, "device": self.device}
        )
