"""Cross-check: our GRPO loss equals TRL's ``GRPOTrainer._compute_loss`` to 1e-6.

TRL's method is driven on a bare trainer object: the loss arithmetic is TRL's own code, and only
the model forward is replaced by the per-token log-probs under test (a real model forward would
check transformers, not GRPO). The log-prob helper is cross-checked separately against TRL's
``selective_log_softmax``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from r1_train.grpo import group_advantages, policy_loss, token_logprobs

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, T, MAX_LEN = 6, 7, 7


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1.0
    return {
        "logp": logp,
        "old": logp + 0.3 * torch.randn(B, T, generator=g),
        "ref": logp + 0.2 * torch.randn(B, T, generator=g),
        "mask": mask,
        "rewards": torch.randint(0, 3, (B,), generator=g).float(),
    }


def _trl_loss(
    b: dict[str, torch.Tensor],
    *,
    loss_type: str,
    beta: float,
    eps: tuple,
    is_ratio: torch.Tensor | None = None,
) -> float:
    from accelerate import Accelerator

    trainer: Any = object.__new__(trl_grpo.GRPOTrainer)
    logp = b["logp"].clone().requires_grad_()
    model = torch.nn.Linear(1, 1).train()
    fields = {
        "model": model,
        "accelerator": Accelerator(cpu=True),
        "args": SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": eps[0],
        "epsilon_high": eps[1],
        "importance_sampling_level": "token",
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "use_vllm": is_ratio is not None,
        "vllm_importance_sampling_correction": is_ratio is not None,
        "aux_loss_enabled": False,
        "_entropy_bonus_enabled": False,
        "current_gradient_accumulation_steps": 1,
        "max_completion_length": MAX_LEN,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_get_per_token_logps_and_entropies": lambda *a, **k: (logp, torch.zeros_like(logp), None),
    }
    for name, value in fields.items():
        object.__setattr__(trainer, name, value)
    adv = group_advantages(b["rewards"], 3)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": b["mask"],
        "advantages": adv,
        "old_per_token_logps": b["old"],
        "ref_per_token_logps": b["ref"],
        "num_items_in_batch": b["mask"].sum(),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return float(trl_grpo.GRPOTrainer._compute_loss(trainer, model, inputs).detach())


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [
        ("grpo", 0.0, (0.2, 0.2)),
        ("grpo", 0.04, (0.2, 0.2)),
        ("dapo", 0.0, (0.2, 0.28)),  # DAPO: token-level and clip-higher
        ("bnpo", 0.01, (0.2, 0.28)),
        ("dr_grpo", 0.0, (0.2, 0.2)),
    ],
)
def test_loss_equals_trl(loss_type: str, beta: float, eps: tuple) -> None:
    for seed in range(3):
        b = _batch(seed)
        ours, _ = policy_loss(
            b["logp"],
            b["old"],
            group_advantages(b["rewards"], 3),
            b["mask"],
            loss_type=loss_type,  # type: ignore[arg-type]
            epsilon_low=eps[0],
            epsilon_high=eps[1],
            beta=beta,
            ref_logp=b["ref"],
            max_completion_length=MAX_LEN,
        )
        assert ours.item() == pytest.approx(
            _trl_loss(b, loss_type=loss_type, beta=beta, eps=eps), abs=1e-6
        )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_importance_weighted_loss_equals_trl(loss_type: str) -> None:
    """Truncated importance sampling (TRL's ``token_truncate``): the weights come from our
    :func:`importance_weights`, TRL applies them in its own loss code."""
    from r1_train.grpo import importance_weights

    for seed in range(3):
        b = _batch(seed)
        sampler = b["old"] + 0.5 * torch.randn(B, T, generator=torch.Generator().manual_seed(seed))
        w = importance_weights(b["old"], sampler, "tis", 2.0)
        assert w is not None
        expected = torch.exp(b["old"] - sampler).clamp(max=2.0)  # TRL's token_truncate, clip_max 2
        assert torch.allclose(w, expected)
        ours, _ = policy_loss(
            b["logp"],
            b["old"],
            group_advantages(b["rewards"], 3),
            b["mask"],
            loss_type=loss_type,  # type: ignore[arg-type]
            beta=0.02,
            ref_logp=b["ref"],
            is_weights=w,
        )
        trl = _trl_loss(b, loss_type=loss_type, beta=0.02, eps=(0.2, 0.2), is_ratio=w)
        assert ours.item() == pytest.approx(trl, abs=1e-6)


def test_token_logprobs_equal_trl() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = trl_utils.selective_log_softmax(logits / 0.7, tokens)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.7), expected, atol=1e-6)
