"""`make demo`'s script runs end to end on the real model and emits GenAI spans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2 + 3 = 5", 5),
        ("17 + 33 is indeed 50.", 50),
        ("40 + 2 = 42\n\nThis is 7 times 6", 42),
        ("12 + 7 = 9x", 9),
        ("The answer is -4", -4),
        ("9 + 19 = An easy way is 28", 28),
        ("no digits here", None),
        ("", None),
    ],
)
def test_first_answer(load_tool, text, expected):
    assert load_tool("demo").first_answer(text) == expected


def test_group_advantages_are_normalised(load_tool):
    demo = load_tool("demo")
    advs = demo.group_advantages([1.0, 0.0, 0.0, 1.0])
    assert advs == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert demo.group_advantages([1.0, 1.0]) == [0.0, 0.0]  # no signal in equal groups


@pytest.mark.slow
def test_demo_runs_and_traces(smollm2_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="demo-under-test")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--questions", "2", "--group-size", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "accuracy" in out.stdout
    assert "2 questions x 3 samples" in out.stdout
    # Console exporter output: one chat span per question under the demo span.
    assert out.stdout.count('"gen_ai.operation.name": "chat"') == 2
    assert '"name": "tangram.demo"' in out.stdout
    assert '"gen_ai.usage.output_tokens"' in out.stdout
    assert '"service.name": "demo-under-test"' in out.stdout
