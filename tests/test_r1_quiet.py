"""A successful run shows the user what the run says, not what its libraries log.

vLLM's INFO lines, Ray's, torch's warnings and the loading bars go to RUN_DIR/logs/r1-train.log;
the terminal shows where the logs are, the table and the plots, and no line that looks like an
error. ``--verbose`` brings the libraries' output back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ERRORISH = re.compile(r"INFO|WARN|Warning|Traceback|[Ee]rror|failed|FAILED|exception", re.M)


def _run(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return subprocess.run(
        [
            sys.executable, "-m", "r1_train", "run",
            f"model.path={model}", "model.dtype=float32",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_total_tokens=128",
            "task.size=4", "rewards.weights={math: 1.0}",
            "run.steps=1", "run.prompts_per_step=2", "run.tensorboard=false",
            f"run.out_dir={out}", *extra,
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_successful_run_prints_progress_table_and_plots_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    done = _run(tiny_model_dir, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    screen = done.stdout + done.stderr
    assert "GRPO steps" in done.stdout  # the table
    assert "plot: " in done.stdout
    log = tmp_path / "run" / "logs" / "r1-train.log"
    assert f"logs in {log}" in done.stderr
    assert "GRPO" in done.stderr  # the progress bar stays on the terminal
    noisy = [line for line in screen.splitlines() if ERRORISH.search(line)]
    assert not noisy, noisy[:10]
    # everything the libraries said is in the log: vLLM's start-up, Ray's
    text = log.read_text()
    assert "vllm" in text.lower()
    assert "INFO" in text


def test_verbose_shows_the_libraries_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = _run(tiny_model_dir, tmp_path / "run", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "INFO" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "logs" / "r1-train.log").exists()
