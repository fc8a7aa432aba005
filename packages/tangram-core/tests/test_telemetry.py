"""Telemetry follows the OTEL_* variables: real SDK, real exporters, real OTLP over HTTP."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from tangram_core.telemetry import TelemetryConfigError, select_exporters, select_protocol

EMIT = textwrap.dedent(
    """
    from tangram_core import configure_telemetry, get_tracer
    handle = configure_telemetry("tangram-test")
    assert configure_telemetry("other") is handle, "configure_telemetry must be set-once"
    with get_tracer().start_as_current_span("unit.of.work") as span:
        span.set_attribute("tangram.action.kind", "sandbox.run")
        print("RECORDING", span.is_recording())
    handle.force_flush()
    print("EXPORTERS", ",".join(handle.traces_exporters) or "-")
    """
)


def run_with_env(code: str, **otel: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose only OTEL_* variables are ``otel``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(otel)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


# --- pure selection logic -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "console, otlp,console"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, ()),
    ],
)
def test_select_exporters(env, expected):
    assert select_exporters(env, "traces") == expected


def test_metrics_follow_their_own_variable():
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}
    assert select_exporters(env, "traces") == ("console",)
    assert select_exporters(env, "metrics") == ()


def test_unknown_exporter_names_the_variable_and_choices():
    with pytest.raises(TelemetryConfigError, match=r"OTEL_TRACES_EXPORTER='zipkin'.*console"):
        select_exporters({"OTEL_TRACES_EXPORTER": "zipkin"}, "traces")


def test_protocol_signal_specific_wins_and_bad_value_is_named():
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert select_protocol(env, "traces") == "http/protobuf"
    assert select_protocol(env, "metrics") == "grpc"
    with pytest.raises(TelemetryConfigError, match="http/json"):
        select_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "traces")


# --- end to end in a fresh process ----------------------------------------------------------


def test_no_variables_means_noop():
    out = run_with_env(EMIT)
    assert out.returncode == 0, out.stderr
    assert "RECORDING False" in out.stdout
    assert "EXPORTERS -" in out.stdout


def test_console_exporter_prints_span_with_service_name():
    out = run_with_env(EMIT, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="svc-from-env")
    assert out.returncode == 0, out.stderr
    assert "RECORDING True" in out.stdout
    assert '"name": "unit.of.work"' in out.stdout
    assert '"tangram.action.kind": "sandbox.run"' in out.stdout
    assert '"service.name": "svc-from-env"' in out.stdout  # OTEL_SERVICE_NAME beats the default


def test_sdk_disabled_wins_over_exporters():
    out = run_with_env(EMIT, OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="console")
    assert out.returncode == 0, out.stderr
    assert "RECORDING False" in out.stdout
    assert "unit.of.work" not in out.stdout


def test_bad_variable_fails_loudly_at_configure():
    out = run_with_env(EMIT, OTEL_TRACES_EXPORTER="jaeger")
    assert out.returncode != 0
    assert "OTEL_TRACES_EXPORTER='jaeger'" in out.stderr


class _Collector(http.server.BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: it keeps every POST body by path."""

    received: dict[str, list[bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.setdefault(self.path, []).append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[tuple[str, dict[str, list[bytes]]]]:
    received: dict[str, list[bytes]] = {}
    handler = type("Handler", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_http_export_reaches_a_collector(otlp_collector):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    endpoint, received = otlp_collector
    out = run_with_env(
        EMIT,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_METRICS_EXPORTER="none",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=ci",
    )
    assert out.returncode == 0, out.stderr
    assert "EXPORTERS otlp" in out.stdout
    assert "/v1/traces" in received, f"collector got {list(received)}"
    request = ExportTraceServiceRequest()
    request.ParseFromString(received["/v1/traces"][0])
    resource = {
        kv.key: kv.value.string_value for kv in request.resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "tangram-test"
    assert resource["deployment.environment"] == "ci"
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["unit.of.work"]
    attrs = {kv.key: kv.value.string_value for kv in spans[0].attributes}
    assert attrs == {"tangram.action.kind": "sandbox.run"}


# --- Prometheus: the orchestrator's own metrics, scraped over HTTP ----------------------------

SCRAPE = textwrap.dedent(
    """
    import asyncio, urllib.request
    from tangram_core import configure_telemetry
    from tangram_core.orchestrator import Orchestrator
    from tangram_core.process_pool import ProcessPoolManager, function_action

    handle = configure_telemetry("tangram-test")
    host, port = handle.prometheus_address
    print("PORT", port)

    async def main():
        async with Orchestrator([ProcessPoolManager(workers=1)]) as orch:
            for _ in range(3):
                result = await orch.submit(function_action("operator:add", 1, 2))
                assert result.ok, result
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read()
            print(body.decode())

    asyncio.run(main())
    handle.shutdown()
    """
)


def test_prometheus_exporter_serves_the_orchestrator_metrics():
    out = run_with_env(
        SCRAPE,
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT="0",
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # three actions completed: the ACT histogram counted them, the gauges are exported
    counts = [
        line for line in text.splitlines() if line.startswith("tangram_action_completion_time")
    ]
    assert any("_count" in line and line.rstrip().endswith(" 3.0") for line in counts), counts
    assert "tangram_action_queue_wait" in text
    # seconds buckets that tell a millisecond sandbox run from a minute-long cold start
    assert 'tangram_action_completion_time_seconds_bucket{le="0.01"' in text
    assert "tangram_resource_utilisation" in text or "tangram_resource_utilization" in text
    assert 'service_name="tangram-test"' in text or "target_info" in text


def test_prometheus_port_taken_or_bad_is_named():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_with_env(
            EMIT,
            OTEL_METRICS_EXPORTER="prometheus",
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
        )
    assert out.returncode != 0
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in out.stderr
    assert "OTEL_EXPORTER_PROMETHEUS_PORT" in out.stderr
    bad = run_with_env(EMIT, OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT="x")
    assert "OTEL_EXPORTER_PROMETHEUS_PORT='x' is not a port number" in bad.stderr


def test_prometheus_is_a_metrics_exporter_only():
    with pytest.raises(TelemetryConfigError, match="prometheus serves metrics only"):
        select_exporters({"OTEL_TRACES_EXPORTER": "prometheus"}, "traces")
    assert select_exporters({"OTEL_METRICS_EXPORTER": "prometheus"}, "metrics") == ("prometheus",)


def test_worker_processes_leave_prometheus_to_their_driver():
    """Ray actors and Serve replicas inherit the driver's OTEL_* variables; they must not all
    try to bind the driver's Prometheus port (the second would fail and take its replica)."""
    code = textwrap.dedent(
        """
        from tangram_core import configure_telemetry
        handle = configure_telemetry("replica", serve_metrics=False)
        print("EXPORTERS", handle.metrics_exporters, handle.prometheus_address)
        """
    )
    out = run_with_env(code, OTEL_METRICS_EXPORTER="prometheus,console")
    assert out.returncode == 0, out.stderr
    assert "EXPORTERS ('console',) None" in out.stdout
