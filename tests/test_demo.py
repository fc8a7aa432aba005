"""`make demo` runs r1-train end to end on SmolLM2 and traces every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_trains_and_traces(smollm2_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="demo-under-test")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "demo.py"),
            "--steps", "1",
            "--out", str(tmp_path / "demo"),
            "run.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=16",
            "run.progress=false",
            # a complete first tool call, so that the tool path runs whatever the model writes
            "agent.prefill='<code>print(6 * 7)</code>'",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "GRPO steps" in out.stdout  # the reward table
    assert "reward_mean" in out.stdout
    rows = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["samples"] == 4
    assert rows[0]["tool_calls"] >= 1
    assert (tmp_path / "demo" / "plots" / "reward.png").is_file()
    # console exporter: the step, its rollout, the model calls, the tools and the rewards
    for name in (
        '"name": "tangram.train.step"',
        '"name": "text_completion smollm2-135m-instruct"',
        '"name": "execute_tool python"',
        '"name": "tangram.train.reward"',
        '"name": "tangram.train.weight_sync"',
    ):
        assert name in out.stdout, name
    assert '"service.name": "demo-under-test"' in out.stdout
