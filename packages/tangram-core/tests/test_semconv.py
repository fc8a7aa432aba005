"""Our GenAI names must be exactly the OpenTelemetry semantic-convention names."""

from __future__ import annotations

import pytest

from tangram_core import semconv

gen_ai = pytest.importorskip(
    "opentelemetry.semconv._incubating.attributes.gen_ai_attributes",
    reason="opentelemetry-semantic-conventions ships with opentelemetry-sdk",
)


def test_gen_ai_attributes_match_upstream():
    ours = {n: v for n, v in vars(semconv).items() if n.startswith("GEN_AI_")}
    assert len(ours) >= 15
    for name, value in ours.items():
        assert getattr(gen_ai, name) == value, name


def test_operation_values_are_upstream_values():
    upstream = {v.value for v in gen_ai.GenAiOperationNameValues}
    ours = {v for n, v in vars(semconv).items() if n.startswith("OP_")}
    assert ours <= upstream


def test_gen_ai_metric_names_match_upstream():
    from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as m

    assert semconv.METRIC_GEN_AI_TOKEN_USAGE == m.GEN_AI_CLIENT_TOKEN_USAGE
    assert semconv.METRIC_GEN_AI_OPERATION_DURATION == m.GEN_AI_CLIENT_OPERATION_DURATION


def test_span_name_follows_gen_ai_rule():
    assert semconv.gen_ai_span_name("chat", "smollm2") == "chat smollm2"
    assert semconv.gen_ai_span_name("execute_tool", None) == "execute_tool"


def test_tangram_names_are_namespaced_and_unique():
    values = [
        v for n, v in vars(semconv).items() if n.isupper() and isinstance(v, str) and "." in v
    ]
    assert len(values) == len(set(values)), "two constants share one name"
    tangram = [v for v in values if not v.startswith(("gen_ai.", "error."))]
    assert tangram
    assert all(v.startswith("tangram.") for v in tangram), tangram
