"""`tangram-core simulate` and `tangram-core report`, as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tangram_core.sim import CodeAgentWorkload, TraceRecord, save_trace
from tangram_core.sim.workloads import poisson_actions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tangram_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def trace_file(tmp_path):
    w = CodeAgentWorkload(seed=3)
    records = []
    for t, a in poisson_actions(300, 20.0, w, reward_share=0.2):
        s = a.spec
        records.append(
            TraceRecord(
                id=s.id,
                kind=s.kind,
                arrival_s=t,
                duration_s=a.true_t1,
                demand=dict(s.demand),
                max_units=s.max_units,
            )
        )
    path = tmp_path / "trace.jsonl"
    save_trace(records, path)
    return path


def test_simulate_then_report_with_plots(tmp_path, trace_file):
    run = tmp_path / "run.jsonl"
    out = cli("simulate", str(trace_file), "--cpu", "16", "--gpu", "2", "--out", str(run))
    assert out.returncode == 0, out.stderr
    assert "300 actions" in out.stdout
    lines = [json.loads(line) for line in run.read_text().splitlines()]
    assert len(lines) == 300
    assert all(line["end"] >= line["start"] >= line["submit"] for line in lines)
    assert any(line["units"] > 1 for line in lines)  # elastic actions got more than one core

    rep = cli("report", str(run), "--out", str(tmp_path / "plots"))
    assert rep.returncode == 0, rep.stderr
    for kind in ("sandbox.run", "sandbox.run_tests", "all"):
        assert kind in rep.stdout
    for name in ("act_cdf.png", "utilisation.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000  # a drawn figure, not an empty canvas


def test_isolated_and_static_schedulers_are_slower_on_the_same_trace(tmp_path, trace_file):
    means = {}
    for sched in ("elastic", "isolated", "static"):
        run = tmp_path / f"{sched}.jsonl"
        args = ["--scheduler", sched, "--cpu", "16", "--gpu", "4", "--out", str(run)]
        out = cli("simulate", str(trace_file), *args)
        assert out.returncode == 0, out.stderr
        assert "act_over_capacity_bound" in out.stdout
        acts = [
            json.loads(x)["end"] - json.loads(x)["submit"] for x in run.read_text().splitlines()
        ]
        means[sched] = sum(acts) / len(acts)
    assert means["elastic"] < means["isolated"]
    assert means["elastic"] < means["static"]


def test_user_errors_exit_2_with_one_clear_line(tmp_path, trace_file):
    missing = cli("report", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "nope.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "x", "submit": 0, "end": 1}\n{"kind": "x"}\n')
    out = cli("report", str(bad), "--no-plots")
    assert out.returncode == 2
    assert "bad.jsonl:2: invalid run record" in out.stderr
    big = tmp_path / "big.jsonl"
    save_trace([TraceRecord(id="w", kind="k", arrival_s=0, duration_s=1, demand={"cpu": 99})], big)
    out = cli("simulate", str(big), "--cpu", "4")
    assert out.returncode == 2
    assert "more than the pool can ever hold" in out.stderr
    out = cli("simulate", str(trace_file), "--scheduler", "isolated", "--gpu", "2")
    assert out.returncode == 2
    assert "raise --gpu to at least 4" in out.stderr


def test_simulate_is_a_span_with_its_figures_under_otel_variables(tmp_path, trace_file):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = "console"
    args = ["simulate", str(trace_file), "--cpu", "16", "--gpu", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "tangram_core.cli", *args, "--out", str(tmp_path / "r.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert '"name": "tangram.cli.simulate"' in out.stdout
    assert '"tangram.sim.actions": 300' in out.stdout
    assert '"service.name": "tangram-core"' in out.stdout
    env["OTEL_TRACES_EXPORTER"] = "jaeger"
    bad = subprocess.run(
        [sys.executable, "-m", "tangram_core.cli", *args], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert "OTEL_TRACES_EXPORTER='jaeger'" in bad.stderr
