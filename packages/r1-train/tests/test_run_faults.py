"""Faults of a run that must be loud and leave nothing behind, checked without vLLM.

Each test reproduces one fault for real: a file-size limit makes the checkpoint write fail in
the kernel (EFBIG), a dead process leaves its weight-sync folder, a crash leaves duplicate and
torn log rows, a data file holds a blank answer or a prompt longer than the context.
(The faults that need the engine are in the root ``tests/test_r1_faults.py``.)
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from r1_train.checkpoint import (
    CheckpointWriteFailed,
    latest_checkpoint,
    next_step,
    save_checkpoint,
)
from r1_train.config import load_config
from r1_train.metrics import trim_step_logs
from r1_train.rollout import WEIGHT_DROP_PREFIX, _WeightDrop, remove_stale_weight_drops
from r1_train.tasks import load_tasks


def _rows(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_trim_step_logs_keeps_each_step_before_the_resume_point_once(tmp_path: Path) -> None:
    # what a crash while writing checkpoint 3 leaves: steps 0-2 logged, checkpoint 2 the newest,
    # and a torn last line in samples.jsonl
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (0, 1, 2))
    )
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "trajectory": f"t{s}-{i}"}) + "\n"
            for s in (0, 1, 2)
            for i in (0, 1)
        )
        + '{"step": 2, "traj'
    )
    removed = trim_step_logs(tmp_path, 2)
    assert removed == {"metrics.jsonl": 1, "samples.jsonl": 3}
    assert _rows(tmp_path / "metrics.jsonl") == [0, 1]
    assert _rows(tmp_path / "samples.jsonl") == [0, 0, 1, 1]
    assert trim_step_logs(tmp_path, 2) == {"metrics.jsonl": 0, "samples.jsonl": 0}


def test_blank_answer_is_refused_at_load_time_with_file_and_row(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(
        json.dumps({"prompt": "What is 2 + 2?", "answer": "4"})
        + "\n"
        + json.dumps({"prompt": "What is 3 + 3?", "answer": "  \t"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"t\.jsonl: row 2: .*blank 'answer'"):
        load_tasks(f)


def test_overlong_prompt_is_refused_before_anything_starts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from r1_train.trainer import Trainer

    f = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": "What is " + " + ".join(["1"] * 200) + "?", "answer": "200"},
        {"prompt": "What is 1 + 1?", "answer": "2"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "task.kind=jsonl",
            f"task.path={f}",
            "task.template=plain",
            "rollout.max_new_tokens=16",
            "rollout.max_total_tokens=128",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    # the engine is never reached: the check runs before the policy and vLLM start
    with pytest.raises(
        ValueError, match=r"long\.jsonl: row 2 \(id 'long-2'\): the prompt is \d+ tokens"
    ) as info:
        Trainer(cfg)
    assert "1 prompt(s)" in str(info.value)
    assert "max_total_tokens (128)" in str(info.value)


def _policy(model_dir: Path) -> tuple[Any, Any]:
    """The tiny model's policy (with its AdamW) and tokenizer."""
    from transformers import AutoTokenizer

    from r1_train.config import GRPOConfig, ModelConfig, OptimConfig
    from r1_train.policy import Policy

    model = ModelConfig(path=model_dir, dtype="float32")
    policy = Policy(model, OptimConfig(), GRPOConfig(), total_steps=2, temperature=1.0)
    return policy, AutoTokenizer.from_pretrained(model_dir)


def test_checkpoint_write_failure_says_what_and_where_and_cleans_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    policy, tokenizer = _policy(tiny_model_dir)
    run = tmp_path / "run"
    save_checkpoint(run, 1, policy, tokenizer)
    # the kernel refuses to grow any file past 64 KiB: the write fails for real (EFBIG), as a
    # full disk does (ENOSPC); SIGXFSZ ignored so that write() returns the error
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointWriteFailed) as info:
            save_checkpoint(run, 2, policy, tokenizer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(info.value)
    assert info.value.errno == errno.EFBIG, msg
    assert "File too large" in msg, msg
    assert str(run / "checkpoint-000002") in msg, msg
    assert f"previous checkpoint {run / 'checkpoint-000001'} is kept" in msg, msg
    assert not list(run.glob(".tmp-checkpoint-*")), "the partial folder must be removed"
    assert latest_checkpoint(run) == run / "checkpoint-000001"
    assert next_step(run / "checkpoint-000001") == 1


def test_stale_weight_sync_folders_are_removed_at_the_next_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now (pids are not reused this fast)
    stale = tmp_path / f"{WEIGHT_DROP_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{WEIGHT_DROP_PREFIX}{os.getpid()}-def"
    legacy = tmp_path / f"{WEIGHT_DROP_PREFIX}xyz"  # no pid: not ours to judge
    for d in (stale, live, legacy):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1024)
    assert remove_stale_weight_drops(tmp_path) == [stale]
    assert not stale.exists()
    assert live.exists()
    assert legacy.exists()

    # and a new engine's folder does it where the folders really live
    drop = _WeightDrop()
    try:
        shm_stale = drop.dir.parent / f"{WEIGHT_DROP_PREFIX}{dead.pid}-test"
        shm_stale.mkdir()
        second = _WeightDrop()
        second.remove()
        assert not shm_stale.exists()
        assert drop.dir.exists(), "a live run's folder is kept"
        assert drop.dir.name.startswith(f"{WEIGHT_DROP_PREFIX}{os.getpid()}-")
    finally:
        drop.remove()


def test_cli_refuses_bad_data_with_status_2_and_no_traceback(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "What is 3 + 3?", "answer": " "}) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "r1_train",
            "run",
            f"model.path={tiny_model_dir}",
            "task.kind=jsonl",
            f"task.path={f}",
            f"run.out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"r1-train: {f}: row 1: " in out.stderr, out.stderr[-2000:]
    assert "blank 'answer'" in out.stderr
    assert "Traceback" not in out.stderr
