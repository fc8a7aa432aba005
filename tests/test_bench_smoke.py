"""The benchmarks still run end to end (small sizes) and write the keys the issues ask for.

Not a timed test: it asserts what the JSON holds, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(
    tmp_path: Path, name: str, args: tuple[str, ...] = ("--quick",), timeout: float = 600
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run ``tools/bench/<name>.py`` with ``args``, writing its JSON under ``tmp_path``; the
    finished process (it must have succeeded) and the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / f"tools/bench/{name}.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


@pytest.mark.slow
def test_tangram_sim_quick(tmp_path):
    run, result = run_bench(tmp_path, "tangram_sim")
    for key in (
        "act_ratio_vs_static",
        "act_ratio_vs_isolated",
        "resource_saving_at_equal_p50_act",
        "step_speedup_vs_static",
        "decisions_per_s",
        "sim_1m_actions_seconds",
    ):
        assert key in result, key
    assert result["act_ratio_vs_static"] > 1.0  # deterministic simulation, not a timing
    assert set(result["workloads"]) == {"paper_like", "tool_heavy"}
    # "Up to" figures are the best grid row, so never below the headline setting's.
    for key in ("act_ratio_vs_static", "step_speedup_vs_static"):
        assert result["up_to"][key]["value"] >= result[key]
    # With no queueing the step is its slowest trajectory's path: the simulator's floor and
    # the path worked out from the plans alone must agree, and no scheduler beats the floor.
    for workload in result["workloads"].values():
        for row in workload["grid"]:
            path = row["step_floor_critical_path"]
            assert path["mean_s"] == pytest.approx(row["step_floor_s"], rel=1e-9)
            assert 0 < path["rigid_s"] < path["mean_s"]
            assert row["tangram"]["step_mean_s"] >= row["step_floor_s"] * (1 - 1e-9)
            assert row["static"]["step_mean_s"] >= row["step_floor_s"] * (1 - 1e-9)
    assert "x1." in run.stdout or "x2." in run.stdout  # the ratio table was printed


@pytest.mark.slow
def test_r1_step_quick(tmp_path):
    """The r1-train benchmark at toy sizes on the tiny model: ours, TRL, and the agent loop
    with tangram scheduling and with static sandbox leases (independent trajectories)."""
    args = ("--model", "tiny", "--steps", "2", "--prompts", "2", "--group", "2", "--tokens", "8")
    _, result = run_bench(tmp_path, "r1_step", (*args, "--micro", "4"), timeout=1800)
    for key in (
        "step_seconds",
        "trl_step_seconds",
        "speedup_vs_trl",
        "agent_step_speedup_vs_static",
    ):
        assert result[key] is not None, key
    assert set(result["step_breakdown"]) == {"generation", "tools", "rewards", "update", "sync"}
    # the agent runs made real tool calls under both schedulers
    assert result["details"]["agent_tangram"]["tool_calls"] > 0
    assert result["details"]["agent_static"]["tool_calls"] > 0


@pytest.mark.slow
def test_r1_replay_quick(tmp_path, capsys):
    """A real r1-train run (sandbox tool calls, rule rewards) replayed through the simulator;
    its span export, fed to ``tangram-core trace-from-otel``, gives the bench's figures back."""
    _, result = run_bench(tmp_path, "r1_replay", timeout=900)
    assert result["actions_per_kind"]["sandbox.run"] > 0
    assert any(k.startswith("reward.") for k in result["actions_per_kind"])
    assert result["actions"] == sum(result["actions_per_kind"].values())
    for key in ("real_act_mean_s", "replay_act_mean_s", "replay_act_error", "pools", "capacity"):
        assert result[key] is not None, key
    spans = tmp_path / "r1_replay_spans.json"
    assert spans.is_file()
    from tangram_core.cli import main as tangram_core

    capacity = ",".join(f"{r}={c:g}" for r, c in result["capacity"].items())
    pools = [
        f"--pool={name}=" + ",".join(f"{r}:{d:g}" for r, d in demand.items())
        for name, demand in result["pools"].items()
    ]
    argv = ["trace-from-otel", str(spans), *pools, "--out", str(tmp_path / "trace.jsonl")]
    assert tangram_core([*argv, "--replay", capacity]) == 0
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert len(lines) == result["actions"]
    # the same trace through the same (deterministic) simulator: the bench's error, to print
    assert f"replay_act_error {result['replay_act_error']:.3f}" in capsys.readouterr().out


@pytest.mark.slow
def test_sandbox_bench_quick(tmp_path):
    """The sandbox bench measures warm and cold runs in turns and writes every ratio target."""
    from tangram_sandbox.isolation import capabilities

    caps = capabilities()
    if not (caps.available("mount_ns") and caps.available("private_tmp")):
        pytest.skip(f"no mount namespace here: {caps.layer('mount_ns').detail}")
    run, result = run_bench(tmp_path, "sandbox")
    for key in (
        "warm_vs_cold_subprocess_speedup",
        "warm_vs_cold_bwrap_speedup",
        "http_over_api_p50",
        "throughput_per_s",
        "batched_tests_speedup",
    ):
        assert key in result, key
        assert key in result["targets"], key
    assert result["sizes"]["measured_in_turns_of"] > 0
    assert result["warm_vs_cold_subprocess_speedup"] > 0
    assert result["replaced_workers"] == 0  # no worker died during the bench
    assert "vs cold subprocess" in run.stdout  # the ratio table was printed
