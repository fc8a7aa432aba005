#!/usr/bin/env python3
"""Tangram demo: a short GRPO run of SmolLM2-135M-Instruct on arithmetic with a Python tool.

Everything real and started by the run: vLLM on CPU for rollouts, the sandbox pool for the
model's tool calls, reward-serve's verifier on a local Ray Serve for rewards, all scheduled as
actions by tangram-core; one OpenTelemetry trace per step. It prints a table of reward per step
and writes metrics, samples, plots and checkpoints under ``runs/demo``.

    make demo                                  # 4 steps (packages/r1-train/configs/demo.yaml)
    python tools/demo.py --steps 2 rollout.group_size=2
    OTEL_TRACES_EXPORTER=console make demo     # see the spans

Extra arguments are r1-train config overrides (``section.field=value``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
CONFIG = ROOT / "packages" / "r1-train" / "configs" / "demo.yaml"


def model_path() -> Path:
    """SmolLM2, built offline by tools/models on first use."""
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure("smollm2"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (config: 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("overrides", nargs="*", help="r1-train config overrides")
    args = parser.parse_args(argv)

    from r1_train.cli import main as r1_train

    overrides = [f"model.path={model_path()}", f"run.out_dir={args.out}"]
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.out.exists():
        import shutil

        shutil.rmtree(args.out)  # a demo starts fresh; use r1-train run --resume to continue
    return r1_train(["run", "--config", str(CONFIG), *overrides, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
