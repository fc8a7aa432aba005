"""What clients send reward-serve, and how a refusal is worded: plain pydantic, no Ray.

Why apart from the deployments: the HTTP gateway validates requests before they reach Serve,
``tangram-reward check`` validates a deployments file, and the TRL reward function builds
requests, all without importing Ray; the Serve deployments (:mod:`.serve_app`) validate the same
models again inside their replicas. :class:`~tangram_reward.rules.request.RuleRequest` is the
rule verifiers' request, kept beside the rules it feeds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tangram_reward.rules.request import RuleRequest

__all__ = ["RuleRequest", "ScoreRequest", "error_text", "first_error", "validation_errors"]


class ScoreRequest(BaseModel):
    """A reward model's or a judge's request: one prompt and the response to score."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str
    response: str = Field(min_length=1)
    model_id: str | None = Field(None, description="Checkpoint path; the default if unset.")


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Each failed field and its rule, as the HTTP 422 body and handle errors list them."""
    return [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]} for e in exc.errors()]


def first_error(exc: ValidationError) -> str:
    """The first error as ``field: rule`` (just the rule for a cross-field check)."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    return f"{field}: {err['msg']}" if field else str(err["msg"])


def error_text(exc: ValidationError) -> str:
    """The first error's own message, without pydantic's "Value error, " prefix or its
    documentation URL (``str(exc)`` ends with that URL, which says nothing about the value)."""
    return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
