"""OpenTelemetry setup from the standard ``OTEL_*`` variables, and the project's tracer/meter.

Why this shape: library code calls :func:`get_tracer`/:func:`get_meter` unconditionally. Until
an application calls :func:`configure_telemetry`, OpenTelemetry's API hands out no-op proxies,
so emitting a span costs almost nothing and callers never check whether telemetry is on
(the same contract as the OTel API package). Exporters are chosen only by configuration:

* ``OTEL_SDK_DISABLED=true``: nothing is installed.
* ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: a comma list of ``otlp``, ``console``,
  ``none`` (metrics also ``prometheus``). When unset, ``otlp`` is chosen if an OTLP endpoint is
  set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the signal-specific one), else ``none``.
* ``OTEL_METRICS_EXPORTER=prometheus``: the process serves its metrics (action completion
  time, queue wait, queue length, utilisation, capacity, scale events) for Prometheus to
  scrape at ``http://OTEL_EXPORTER_PROMETHEUS_HOST:OTEL_EXPORTER_PROMETHEUS_PORT/metrics``
  (defaults ``localhost`` and 9464, the specification's; port 0 picks a free one, reported on
  the handle). Needs the ``tangram-core[prometheus]`` extra.
* ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``/``..._METRICS_PROTOCOL``):
  ``http/protobuf`` (default) or ``grpc``. Endpoint, headers, timeouts, compression, sampler
  (``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``) and resource
  (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) are read by the SDK itself.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "tangram"
_KNOWN_EXPORTERS = {"otlp", "console", "none"}
_METRICS_ONLY = {"prometheus"}  # pull exporters: there is no Prometheus format for spans
PROMETHEUS_INSTALL = "pip install 'tangram-core[prometheus]'"
_PROTOCOLS = {"http/protobuf", "grpc"}


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable holds a value Tangram cannot honour; the message names it."""


@dataclass
class TelemetryHandle:
    """What :func:`configure_telemetry` installed, so the caller can flush it before exiting.

    Short-lived processes (a CLI, a test) lose buffered spans unless they flush; the SDK's
    atexit hook covers normal exits, this covers forked workers and explicit shutdowns.
    """

    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()
    tracer_provider: Any = None
    meter_provider: Any = None
    prometheus_address: tuple[str, int] | None = None  # where /metrics is served, if it is
    _prometheus_server: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.traces_exporters or self.metrics_exporters)

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        with self._lock:
            for provider in (self.tracer_provider, self.meter_provider):
                if provider is not None:
                    provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        with self._lock:
            for provider in (self.tracer_provider, self.meter_provider):
                if provider is not None:
                    provider.shutdown()
            if self._prometheus_server is not None:
                self._prometheus_server.shutdown()
                self._prometheus_server.server_close()
                self._prometheus_server = None


_state_lock = threading.Lock()
_handle: TelemetryHandle | None = None


def get_tracer(name: str = INSTRUMENTATION_NAME) -> trace.Tracer:
    """The project tracer: a no-op proxy until telemetry is configured, then the real one."""
    from tangram_core import __version__

    return trace.get_tracer(name, __version__)


def get_meter(name: str = INSTRUMENTATION_NAME) -> metrics.Meter:
    """The project meter; like :func:`get_tracer`, safe to call before configuration."""
    from tangram_core import __version__

    return metrics.get_meter(name, __version__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def select_exporters(env: Mapping[str, str], signal: str) -> tuple[str, ...]:
    """Which exporters ``signal`` ("traces" or "metrics") gets under ``env``; pure."""
    var = f"OTEL_{signal.upper()}_EXPORTER"
    raw = env.get(var)
    if raw is None or not raw.strip():
        has_endpoint = bool(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        )
        return ("otlp",) if has_endpoint else ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    known = _KNOWN_EXPORTERS | (_METRICS_ONLY if signal == "metrics" else set())
    unknown = [n for n in names if n not in known]
    if unknown:
        why = ""
        if set(unknown) & _METRICS_ONLY:
            why = " (prometheus serves metrics only: set it in OTEL_METRICS_EXPORTER)"
        raise TelemetryConfigError(
            f"{var}={raw!r}: unknown exporter(s) {unknown}{why}; "
            f"use a comma list of {sorted(known)}"
        )
    return tuple(n for n in names if n != "none")


def select_protocol(env: Mapping[str, str], signal: str) -> str:
    """The OTLP wire protocol for ``signal``: the signal-specific variable wins over the generic."""
    var = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    value = env.get(var) or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if value not in _PROTOCOLS:
        raise TelemetryConfigError(
            f"OTLP protocol {value!r} (from {var} or OTEL_EXPORTER_OTLP_PROTOCOL) is not "
            f"supported; use one of {sorted(_PROTOCOLS)}"
        )
    return value


# (signal, protocol) -> (module, class); imported only when chosen.
_OTLP_EXPORTERS = {
    ("traces", "http/protobuf"): (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "OTLPSpanExporter",
    ),
    ("traces", "grpc"): (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "OTLPSpanExporter",
    ),
    ("metrics", "http/protobuf"): (
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "OTLPMetricExporter",
    ),
    ("metrics", "grpc"): (
        "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
        "OTLPMetricExporter",
    ),
}


def _otlp_exporter(signal: str, protocol: str) -> Any:
    """Build the OTLP exporter; it reads endpoint, headers and timeouts from the environment."""
    module_name, class_name = _OTLP_EXPORTERS[(signal, protocol)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = (
            "opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc" else "tangram-core[otlp]"
        )
        raise TelemetryConfigError(
            f"OTLP {signal} export over {protocol} was requested (OTEL_* variables) but its "
            f"exporter is not installed: pip install '{extra}'"
        ) from exc
    return getattr(module, class_name)()


def configure_telemetry(
    service_name: str = "tangram",
    *,
    resource_attributes: Mapping[str, str | int | float | bool] | None = None,
    env: Mapping[str, str] | None = None,
    serve_metrics: bool = True,
) -> TelemetryHandle:
    """Install tracing and metrics providers chosen by the ``OTEL_*`` variables.

    Call it once, at the start of an application (a trainer, a server, the demo). A second call
    returns the first handle: OpenTelemetry's global providers can be set only once per process,
    and silently building a second, disconnected pipeline would lose spans.

    ``service_name`` is a default: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    win, as the specification asks. ``serve_metrics=False`` is for processes that a framework
    starts many of on one host (Ray actors, Serve replicas: they inherit the driver's
    environment): they leave ``prometheus`` out rather than all fight for its port.
    """
    global _handle
    env = os.environ if env is None else env
    with _state_lock:
        if _handle is not None:
            return _handle
        if _truthy(env.get("OTEL_SDK_DISABLED")):
            logger.info("OTEL_SDK_DISABLED is set: telemetry stays no-op")
            _handle = TelemetryHandle()
            return _handle

        traces = select_exporters(env, "traces")
        metric_names = select_exporters(env, "metrics")
        if not serve_metrics and "prometheus" in metric_names:
            metric_names = tuple(n for n in metric_names if n != "prometheus")
            logger.info("prometheus left out in this worker process: its driver serves metrics")
        handle = TelemetryHandle(traces_exporters=traces, metrics_exporters=metric_names)
        if not traces and not metric_names:
            _handle = handle
            return handle

        from opentelemetry.sdk.resources import Resource

        attrs: dict[str, Any] = dict(resource_attributes or {})
        if not env.get("OTEL_SERVICE_NAME"):
            attrs.setdefault("service.name", service_name)
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over `attrs`.
        resource = Resource.create(attrs)

        if traces:
            handle.tracer_provider = _tracer_provider(env, traces, resource)
            trace.set_tracer_provider(handle.tracer_provider)
        if metric_names:
            handle.meter_provider = _meter_provider(env, metric_names, resource, handle)
            metrics.set_meter_provider(handle.meter_provider)
        logger.info(
            "telemetry on: traces=%s metrics=%s service=%s",
            ",".join(traces) or "none",
            ",".join(metric_names) or "none",
            resource.attributes.get("service.name"),
        )
        _handle = handle
        return handle


def _tracer_provider(env: Mapping[str, str], names: tuple[str, ...], resource: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            exporter = _otlp_exporter("traces", select_protocol(env, "traces"))
            provider.add_span_processor(BatchSpanProcessor(exporter))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider


def _prometheus_reader(env: Mapping[str, str], handle: TelemetryHandle) -> Any:
    """A pull reader and the HTTP server Prometheus scrapes (``/metrics``), started now so that
    a taken port fails the configuration, naming the variables, instead of a scrape later."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise TelemetryConfigError(
            f"OTEL_METRICS_EXPORTER=prometheus needs {exc.name}: {PROMETHEUS_INSTALL}"
        ) from exc
    host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
    raw_port = env.get("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
    try:
        port = int(raw_port)
        if not 0 <= port <= 65535:
            raise ValueError(raw_port)
    except ValueError:
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_PROMETHEUS_PORT={raw_port!r} is not a port number (0-65535)"
        ) from None
    reader = PrometheusMetricReader()
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise TelemetryConfigError(
            f"cannot serve Prometheus metrics on {host}:{port} ({exc.strerror or exc}); set "
            "OTEL_EXPORTER_PROMETHEUS_PORT to a free port (0 picks one) or "
            "OTEL_EXPORTER_PROMETHEUS_HOST to an address of this host"
        ) from exc
    handle._prometheus_server = server
    handle.prometheus_address = (host, server.server_address[1])
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_address[1])
    return reader


def _meter_provider(
    env: Mapping[str, str], names: tuple[str, ...], resource: Any, handle: TelemetryHandle
) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    readers = []
    for name in names:
        if name == "prometheus":
            readers.append(_prometheus_reader(env, handle))
            continue
        if name == "otlp":
            exporter = _otlp_exporter("metrics", select_protocol(env, "metrics"))
        else:
            exporter = ConsoleMetricExporter()
        # The reader honours OTEL_METRIC_EXPORT_INTERVAL / _TIMEOUT by itself.
        readers.append(PeriodicExportingMetricReader(exporter))
    return MeterProvider(resource=resource, metric_readers=readers)
