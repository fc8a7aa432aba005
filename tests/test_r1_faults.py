"""r1-train faults that need the engine: each one must stop the run loudly, or leave its logs
exact. One real vLLM engine (tiny model, CPU) is shared by the module, with the session's real
Ray and the math verifier on Ray Serve; the test that kills the engine runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from r1_train.config import TrainConfig, load_config
from r1_train.rollout import VLLMEngine
from r1_train.tasks import Task
from r1_train.trainer import Trainer

pytestmark = pytest.mark.slow


def _config(model: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"model.path={model}",
            "model.dtype=float32",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "rollout.max_total_tokens=256",
            "task.kind=arithmetic",
            "task.size=8",
            "rewards.weights={math: 1.0}",
            "optim.lr=0.001",
            "run.prompts_per_step=2",
            "run.progress=false",
            "run.tensorboard=false",
            f"run.out_dir={out}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    cfg = _config(tiny_model_dir, tmp_path_factory.mktemp("unused"))
    eng = VLLMEngine(tiny_model_dir, cfg.rollout, seed=cfg.run.seed, dtype="float32")
    try:
        yield eng
    finally:
        eng.close()


def _train(cfg: TrainConfig, engine: VLLMEngine, tasks: list[Task] | None = None) -> Any:
    """One run over the shared engine (``Trainer.close`` would close it: only metrics close)."""
    trainer = Trainer(cfg, engine=engine)
    if tasks is not None:
        trainer.tasks = tasks
    try:
        return asyncio.run(trainer.train())
    finally:
        trainer.metrics.close()


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_resume_after_a_crash_in_a_checkpoint_write_logs_each_step_once(
    engine: VLLMEngine, tiny_model_dir: Path, tmp_path: Path, ray_session: Any
) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "run.steps=2", "run.save_every=1")
    _train(cfg, engine)
    assert _steps(tmp_path / "metrics.jsonl") == [0, 1]
    # what a crash while writing the step-2 checkpoint leaves: step 1 logged, its checkpoint a
    # partial folder; the newest complete checkpoint is after step 1 (next step 1)
    import shutil

    from safetensors.torch import load_file

    uninterrupted = load_file(tmp_path / "checkpoint-000002" / "model.safetensors")
    shutil.rmtree(tmp_path / "checkpoint-000002")
    (tmp_path / ".tmp-checkpoint-000002").mkdir()
    (tmp_path / ".tmp-checkpoint-000002" / "model.safetensors").write_bytes(b"partial")

    (again,) = _train(
        cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}), engine
    )
    assert again.step == 1
    assert _steps(tmp_path / "metrics.jsonl") == [0, 1]
    samples = _steps(tmp_path / "samples.jsonl")
    assert sorted(set(samples)) == [0, 1]
    assert samples.count(0) == samples.count(1) == 4  # every sample of a step, once
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))
    # with rule rewards only, the redone step is bit for bit the step of the first run
    resumed = load_file(tmp_path / "checkpoint-000002" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_a_reward_that_raises_fails_the_run_and_names_the_task(
    engine: VLLMEngine, tiny_model_dir: Path, tmp_path: Path, ray_session: Any
) -> None:
    from r1_train.rewards import RewardError

    cfg = _config(tiny_model_dir, tmp_path, "run.steps=2", "run.save_every=1")
    # a blank reference that the loader would refuse, to reach the verifier's own ValueError
    blank = Task.model_construct(
        id="blank-answer", prompt="What is 1 + 1?", answer=" ", tests=(), numbers=(), target=None
    )
    with pytest.raises(RewardError) as info:
        _train(cfg, engine, tasks=[blank])
    msg = str(info.value)
    assert "'blank-answer'" in msg, msg
    assert "ValueError" in msg, msg
    assert "step 0" in msg, msg
    assert "reference" in msg, msg  # the verifier's own words
    assert not (tmp_path / "metrics.jsonl").exists() or not _steps(tmp_path / "metrics.jsonl")
    assert not list(tmp_path.glob("checkpoint-*")), "nothing trained: no checkpoint"


def test_a_dead_engine_names_the_step_the_groups_lost_and_the_checkpoint(
    engine: VLLMEngine, tiny_model_dir: Path, tmp_path: Path, ray_session: Any
) -> None:
    """Runs last in this module: it kills the shared engine."""
    from r1_train.reaper import _table, descendants
    from r1_train.trainer import StepLost

    cfg = _config(tiny_model_dir, tmp_path, "run.steps=1", "run.save_every=1")
    _train(cfg, engine)
    resumed = cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"resume": True, "steps": 2})}
    )
    trainer = Trainer(resumed, engine=engine)  # brings the engine to checkpoint 1's weights
    # then the engine dies (as under the OOM killer): its core process and its workers, SIGKILL
    manager = engine.llm.llm_engine.engine_core.resources.engine_manager  # type: ignore[attr-defined]
    (core,) = manager.processes
    for pid in [*descendants(core.pid, _table()), core.pid]:
        os.kill(pid, signal.SIGKILL)
    core.join(timeout=30)
    try:
        with pytest.raises(StepLost) as info:
            asyncio.run(trainer.train())
    finally:
        trainer.metrics.close()
    msg = str(info.value)
    assert info.value.step == 1
    assert msg.startswith("step 1: the rollout failed: EngineDeadError"), msg
    assert "EngineCore" in msg, msg
    assert "killed by SIGKILL" in msg, msg
    assert "the 2 group(s) of step 1: prompt 0 (arith-0-" in msg, msg
    assert f"from {tmp_path / 'checkpoint-000001'} (next step 1)" in msg, msg
    assert _steps(tmp_path / "metrics.jsonl") == [0]
