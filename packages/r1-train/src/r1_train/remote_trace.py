"""Spans of the cluster's actors joined to the driver's trace, tagged with node and rank.

Why by hand: a Ray actor call crosses into another process, often on another node, and the
OpenTelemetry context does not travel with it. The driver injects the W3C ``traceparent`` of
its current span into the call's arguments (:func:`current_carrier`); the actor opens its span
as a child of that context (:func:`remote_span`) and returns the span's ids with its answer, so
a caller can check where its work ran. Actors export their spans as the driver does: the
``OTEL_*`` variables travel to them in the job's runtime environment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

NODE_ID = "tangram.node.id"
NODE_IP = "tangram.node.ip"
RANK = "tangram.trainer.rank"
ENGINE = "tangram.rollout.engine"

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("r1_train")


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to pass along with an actor call."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def where() -> dict[str, Any]:
    """This process's place in the cluster: Ray node id and IP, host name and pid."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


@contextmanager
def remote_span(
    name: str, carrier: dict[str, str] | None, attributes: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """A span in an actor, child of the caller's span named by ``carrier``.

    Yields a dict the actor returns to its caller: the trace id, span id and parent span id
    (hex, as exporters write them) and the node it ran on."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    attrs = {NODE_ID: node, NODE_IP: ray.util.get_node_ip_address(), **attributes}
    parent = _PROPAGATOR.extract(carrier or {})
    with _tracer.start_as_current_span(name, context=parent, attributes=attrs) as span:
        ctx = span.get_span_context()
        parent_span = trace.get_current_span(parent).get_span_context()
        yield {
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "parent_span_id": format(parent_span.span_id, "016x"),
            "node_id": node,
            "name": name,
        }
