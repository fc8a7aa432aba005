"""A HySparse model as r1-train's policy: trained by transformers (hysparse-vllm's reference
model), served by vLLM through the hysparse-vllm plugin, weights synced between them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from r1_train.config import load_config
from r1_train.policy import Batch, completion_logprobs
from r1_train.rollout import GenRequest, checkpoint_tensors, weight_fingerprint
from r1_train.trainer import Trainer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_hysparse() -> Path:
    pytest.importorskip("hysparse_vllm")
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure("tiny-hysparse"))


def test_grpo_step_on_a_hysparse_policy(
    tiny_hysparse: Path, tiny_rm_dir: Path, tmp_path: Path, ray_session
) -> None:
    cfg = load_config(
        None,
        [
            f"model.path={tiny_hysparse}",
            "model.dtype=float32",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "rollout.max_total_tokens=256",
            "task.kind=arithmetic",
            "rewards.weights={rm: 1.0}",  # a reward model: scores differ, so the weights move
            f"rewards.rm_path={tiny_rm_dir}",
            "optim.lr=0.001",
            "run.steps=1",
            "run.prompts_per_step=2",
            "run.progress=false",
            "run.tensorboard=false",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg)
    try:
        model = trainer.policy.model
        assert type(model).__name__ == "HySparseForCausalLM"
        fp0 = weight_fingerprint(checkpoint_tensors(model))
        (result,) = asyncio.run(trainer.train())
        assert result.metrics["samples"] == 4
        assert result.metrics["infra_errors"] == 0
        fp1 = weight_fingerprint(checkpoint_tensors(model))
        assert fp1 != fp0
        assert trainer.engine_fingerprint == pytest.approx(fp1, rel=1e-9)
        # vLLM (plugin) and the trainer (reference model) agree on the new weights' log-probs
        prompt = trainer.tokenizer.encode("What is 3 + 4?", add_special_tokens=False)
        (gen,) = trainer.engine.generate([GenRequest(prompt, 6, seed=3)])
        ids = torch.tensor([prompt + gen.token_ids])
        batch = Batch(
            ids, torch.ones_like(ids), torch.tensor([gen.token_ids]),
            torch.ones(1, len(gen.token_ids)), [len(prompt)], torch.zeros(1),
        )  # fmt: skip
        with torch.no_grad():
            ours = completion_logprobs(model.train(False), batch, slice(0, 1), 1.0)[0]
        assert torch.allclose(torch.tensor(gen.logprobs), ours, atol=2e-3)
    finally:
        trainer.close()
