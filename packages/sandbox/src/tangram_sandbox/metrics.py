"""The sandbox pool's OpenTelemetry metrics: run durations and queue waits, workers and queue.

Why here and not only on spans: a server operator watches a dashboard, not traces. These are
what ``tangram-sandbox serve`` exports under ``OTEL_METRICS_EXPORTER`` (``prometheus`` serves
them at ``/metrics``; see tangram-core's README), beside the orchestrator's ACT metrics when the
pool runs behind one. Until telemetry is configured the instruments are OpenTelemetry's no-op
proxies, so recording costs next to nothing on the hot path.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from tangram_core import semconv as sc
from tangram_core.telemetry import get_meter

if TYPE_CHECKING:
    from tangram_sandbox.pool import SandboxPool

METRIC_RUN_DURATION = "tangram.sandbox.run.duration"
METRIC_QUEUE_WAIT = "tangram.sandbox.queue_wait"
METRIC_WORKERS = "tangram.sandbox.workers"

_pools: weakref.WeakKeyDictionary[SandboxPool, str] = weakref.WeakKeyDictionary()
_numbers = itertools.count()
_lock = threading.Lock()
_instruments: dict[str, Any] = {}


def _observe_workers(_options: CallbackOptions) -> Iterable[Observation]:
    for pool, name in list(_pools.items()):
        yield Observation(pool.size, {"tangram.sandbox.pool": name, "state": "up"})
        yield Observation(pool.busy, {"tangram.sandbox.pool": name, "state": "busy"})
        yield Observation(pool.queued, {"tangram.sandbox.pool": name, "state": "queued"})


def _make() -> dict[str, Any]:
    if _instruments:  # every run passes here: no lock once the instruments exist
        return _instruments
    with _lock:
        if not _instruments:
            meter = get_meter()
            _instruments["duration"] = meter.create_histogram(
                METRIC_RUN_DURATION,
                unit="s",
                description="Wall time of a sandboxed run (compile and all tests included).",
                explicit_bucket_boundaries_advisory=sc.SECONDS_BUCKETS,
            )
            _instruments["wait"] = meter.create_histogram(
                METRIC_QUEUE_WAIT,
                unit="s",
                description="From a request's arrival to a worker taking it.",
                explicit_bucket_boundaries_advisory=sc.SECONDS_BUCKETS,
            )
            meter.create_observable_gauge(
                METRIC_WORKERS,
                callbacks=[_observe_workers],
                description="Workers up and busy, and requests queued for one, per pool.",
            )
        return _instruments


def watch(pool: SandboxPool) -> None:
    """Count ``pool`` in the workers gauge for as long as it lives."""
    _make()
    _pools[pool] = f"pool-{next(_numbers)}"


def record(kind: str, language: str, status: str, queue_wait_s: float, wall_s: float) -> None:
    """One finished ``run`` or ``run_tests`` call."""
    instruments = _make()
    attrs = {
        "tangram.sandbox.call": kind,
        sc.SANDBOX_LANGUAGE: language,
        sc.SANDBOX_STATUS: status,
    }
    instruments["duration"].record(wall_s, attrs)
    instruments["wait"].record(queue_wait_s, attrs)
