"""A span per scoring request inside the replica, joined to the action that caused it.

Why by hand: a Serve handle call crosses into another process (the replica), and the
OpenTelemetry context does not travel with it. The caller (``RewardManager``) injects the W3C
``traceparent`` into the call's keyword arguments; the replica extracts it and opens its
``tangram.reward.score`` span as a child of the action span. The span carries what only the
replica knows: its id, the size of the batch the request rode in, and how long it waited for
that batch.

Replicas export spans when their ``OTEL_*`` variables say so (set them for a deployment
through ``RewardDeploymentConfig.env``); without them the span is a no-op that still carries
the caller's trace id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tangram_core import semconv
from tangram_core.telemetry import get_tracer

__all__ = [
    "AttributedReward",
    "Pending",
    "attribution",
    "batch_facts",
    "current_carrier",
    "replica_id",
    "scoring_span",
]

_PROPAGATOR = TraceContextTextMapPropagator()


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to pass along with a remote call."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def replica_id() -> str:
    """This Serve replica's id, or ``"local"`` outside a replica."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or rid or ctx.replica_tag)
    except Exception:
        return "local"


def request_id(given: str | None = None) -> str:
    """``given`` (the caller's id, e.g. HTTP ``X-Request-ID``), else Serve's id of the request
    being handled, else a new one."""
    if given:
        return given
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:
        rid = ""
    return rid or uuid.uuid4().hex


def attribution(
    deployment: str, model_version: str, given_request_id: str | None = None
) -> dict[str, str]:
    """Who produced a reward: the deployment, the model version and the request id."""
    return {
        "deployment": deployment,
        "model_version": model_version,
        "request_id": request_id(given_request_id),
    }


class AttributedReward(float):
    """A scalar reward that computes and compares as a float and carries ``meta`` (its
    attribution and batch facts), so that callers expecting a float keep working."""

    meta: dict[str, Any]

    def __new__(cls, value: float, meta: dict[str, Any]) -> AttributedReward:
        obj = super().__new__(cls, value)
        obj.meta = dict(meta)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (AttributedReward, (float(self), self.meta))


@dataclass
class Pending:
    """One request on its way through ``@serve.batch``: the payload and when it arrived."""

    request: Any
    arrived: float = field(default_factory=time.monotonic)


@contextmanager
def scoring_span(
    carrier: dict[str, str] | None, deployment: str, attributed: dict[str, str] | None = None
) -> Iterator[Any]:
    """The replica-side span of one scoring request, child of the caller's span; it carries
    the :func:`attribution` when given."""
    parent = _PROPAGATOR.extract(carrier or {})
    with get_tracer().start_as_current_span(
        semconv.SPAN_REWARD_SCORE, context=parent, kind=trace.SpanKind.SERVER
    ) as span:
        span.set_attribute(semconv.REWARD_DEPLOYMENT, deployment)
        span.set_attribute(semconv.REWARD_REPLICA, replica_id())
        if attributed:
            span.set_attribute(semconv.REWARD_MODEL_VERSION, attributed["model_version"])
            span.set_attribute(semconv.REWARD_REQUEST_ID, attributed["request_id"])
        yield span


def batch_facts(
    span: Any,
    pending: Pending,
    batch_size: int,
    batch_start: float,
    attributed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Record the batch on ``span``; the same facts for the caller (rewards are attributable)."""
    wait = max(0.0, batch_start - pending.arrived)
    span.set_attribute(semconv.REWARD_BATCH_SIZE, batch_size)
    span.set_attribute(semconv.REWARD_QUEUE_WAIT_S, wait)
    ctx = span.get_span_context()
    parent = getattr(span, "parent", None)  # an SDK span knows it; a no-op span does not
    return {
        **(attributed or {}),
        "replica": replica_id(),
        "batch_size": batch_size,
        "queue_wait_s": wait,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
    }
