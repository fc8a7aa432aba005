"""The shared pytest plugin: import weight, in-memory telemetry, the no-Ray guard, gpu skips."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tangram_core import get_tracer


def test_import_tangram_core_is_light(imported_modules):
    loaded = imported_modules("tangram_core")
    assert not loaded & {"ray", "torch", "vllm", "transformers", "numpy"}, loaded


def test_span_exporter_sees_real_spans(span_exporter):
    with get_tracer().start_as_current_span("outer"), get_tracer().start_as_current_span("inner"):
        pass
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    assert set(spans) == {"outer", "inner"}
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id


def test_span_exporter_starts_empty(span_exporter):
    assert span_exporter.get_finished_spans() == ()


def test_no_ray_refuses_cluster(no_ray):
    ray = pytest.importorskip("ray")
    with pytest.raises(RuntimeError, match="pure-logic test"):
        ray.init()


def test_gpu_marker_skips_without_cuda(pytester):
    # Ask a fresh interpreter: pytester restores sys.modules at teardown, and a torch imported
    # here and then dropped from sys.modules crashes the next torch user in this process.
    probe = "from tangram_core.testing import cuda_available; print(cuda_available())"
    has_cuda = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            import torch
            assert torch.cuda.is_available()

        def test_plain():
            assert 1 + 1 == 2
        """
    )
    result = pytester.runpytest_subprocess("-p", "tangram_core.testing", "-rs")
    if has_cuda == "True":
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*needs a CUDA device (gpu marker)*"])
