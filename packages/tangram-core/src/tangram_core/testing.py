"""Pytest plugin with the fixtures every Tangram package (and downstream project) shares.

Enable it with ``pytest_plugins = ["tangram_core.testing"]`` in a root ``conftest.py``. It is
opt-in rather than auto-loaded through an entry point, so installing tangram-core never changes
somebody else's test session.

* ``ray_session``: one real local Ray per test session (Ray takes ~6 s to start, so tests share
  it), shut down at the end. Integration tests ask for it explicitly.
* ``no_ray``: makes ``ray.init`` raise, for pure-logic tests that must not reach a cluster
  (the pattern Ray Serve's own unit tests use).
* ``span_exporter`` / ``metric_reader``: a real OpenTelemetry SDK pipeline that keeps spans and
  metrics in memory, so tests assert on what the code really emitted.
* markers ``gpu`` (skipped cleanly without CUDA) and ``slow``.
* :func:`hostile_json_bodies`: the hypothesis strategy every HTTP server's fuzz test draws from.

Heavy imports (ray, torch) happen inside the fixtures that need them, never at import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_RAY_NUM_CPUS = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped cleanly without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device; never raises."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); none is visible")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A real local Ray for the whole session: ``ray.init(num_cpus=2, include_dashboard=False)``."""
    import ray

    if ray.is_initialized():  # someone else started it; share, do not own
        yield ray
        return
    ray.init(
        # a Ray of the session's own: a plain ray.init() would join a cluster that another
        # process started with `ray start` (or a ray.cluster_utils.Cluster), and refuse num_cpus
        address="local",
        num_cpus=_RAY_NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to start or join Ray fail loudly inside a pure-logic test."""
    if importlib.util.find_spec("ray") is None:
        return
    import ray

    def _refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("this is a pure-logic test: it must not start or join Ray")

    monkeypatch.setattr(ray, "init", _refuse)


class _InMemoryTelemetry:
    """The session's one SDK pipeline; OTel's global providers can be set only once."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.spans = InMemorySpanExporter()
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(self.spans))

        self.metrics = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.metrics]))


_telemetry: _InMemoryTelemetry | None = None


def _session_telemetry() -> _InMemoryTelemetry:
    global _telemetry
    if _telemetry is None:
        _telemetry = _InMemoryTelemetry()
    return _telemetry


@pytest.fixture
def span_exporter() -> Iterator[Any]:
    """An ``InMemorySpanExporter`` on the global provider, emptied before each test."""
    exporter = _session_telemetry().spans
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture
def metric_reader() -> Any:
    """An ``InMemoryMetricReader`` on the global meter provider (cumulative, session-wide)."""
    return _session_telemetry().metrics


@pytest.fixture
def imported_modules() -> Callable[[str], set[str]]:
    """Import a module in a fresh interpreter and return the top-level modules that came with it.

    Packages that vLLM, Ray workers or a sandbox zygote import on start-up must stay light;
    this is how a test proves it (``"torch" not in imported_modules("pkg")``).
    """

    def probe(module: str) -> set[str]:
        code = (
            "import importlib, json, sys\n"
            f"importlib.import_module({module!r})\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            raise AssertionError(f"import {module} failed:\n{out.stderr[-3000:]}")
        return set(json.loads(out.stdout.strip().splitlines()[-1]))

    return probe


def make_spec(
    id: str,
    *,
    kind: str = "sandbox.run",
    demand: dict[str, float] | None = None,
    est: float = 1.0,
    min_units: int = 1,
    max_units: int = 1,
    parallel_fraction: float = 0.9,
    priority: int = 0,
    trajectory_id: str | None = None,
) -> Any:
    """Build an ``ActionSpec`` for scheduler tests, through the public ``Action`` model."""
    from tangram_core.actions import Action
    from tangram_core.elasticity import Amdahl, Elasticity
    from tangram_core.scheduler import ActionSpec

    action = Action(
        id=id,
        kind=kind,
        demand=demand or {"cpu": 1.0},
        estimated_duration_s=est,
        priority=priority,
        trajectory_id=trajectory_id,
        elasticity=Elasticity(
            min_units=min_units,
            max_units=max_units,
            speedup=Amdahl(parallel_fraction=parallel_fraction),
        ),
    )
    return ActionSpec.from_action(action)


def make_scheduler(capacity: dict[str, float] | None = None, **config: Any) -> Any:
    """An ``ElasticScheduler`` with a capacity (default 4 cpu) and config overrides."""
    from tangram_core.elastic_scheduler import ElasticConfig, ElasticScheduler

    return ElasticScheduler(capacity or {"cpu": 4.0}, config=ElasticConfig(**config))


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone); tests use it to prove no process leaks."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def nested_json(depth: int) -> str:
    """``depth`` nested empty JSON arrays: a body that costs a naive parser its stack."""
    return "[" * depth + "]" * depth


def hostile_json_bodies(
    valid: dict[str, Any],
    bad_fields: dict[str, Any],
    *,
    missing: dict[str, Any],
    huge: Any,
    deep: Any,
    utf8_field: str,
    deep_top_max: int = 30_000,
) -> Any:
    """A hypothesis strategy of request bodies that a JSON endpoint must refuse with a 4xx.

    Why shared: every server in the project promises the same thing, so its fuzz draws from the
    same kinds of hostile body. What is the same for any schema is built here: a field of the
    wrong type or value (from ``bad_fields``, a strategy per field, drawn three times as often),
    an unknown field, invalid UTF-8 in ``utf8_field``, bytes that are not JSON, JSON that is not
    an object, and arrays nested up to ``deep_top_max`` deep. What only the caller knows comes
    in: ``missing`` (a body without a required field), and the ``huge`` and ``deep`` strategies
    (the endpoint's own size limit, and a nested value inside a field it reads)."""
    from hypothesis import strategies as st

    def with_field(name_value: tuple[str, Any]) -> bytes:
        name, value = name_value
        return json.dumps({**valid, name: value}).encode()

    wrong_field = (
        st.sampled_from(sorted(bad_fields))
        .flatmap(lambda name: bad_fields[name].map(lambda v: (name, v)))
        .map(with_field)
    )
    unknown = st.text(min_size=1, max_size=12).filter(
        lambda k: k not in bad_fields and k not in valid
    )
    unknown_field = st.tuples(
        unknown, st.one_of(st.none(), st.integers(), st.text(max_size=5))
    ).map(with_field)
    deep_top = st.integers(1000, deep_top_max).map(lambda d: nested_json(d).encode())
    invalid_utf8 = st.binary(min_size=1, max_size=20).map(
        lambda junk: b'{"' + utf8_field.encode() + b'": "\xff\xfe' + junk + b'"}'
    )
    not_json = st.binary(max_size=64).map(lambda b: b"\x80" + b)
    not_object = st.one_of(
        st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=4), st.none()
    ).map(lambda v: json.dumps(v).encode())
    return st.one_of(
        wrong_field,
        wrong_field,
        wrong_field,
        unknown_field,
        st.just(json.dumps(missing).encode()),
        huge,
        deep,
        deep_top,
        invalid_utf8,
        not_json,
        not_object,
    )
