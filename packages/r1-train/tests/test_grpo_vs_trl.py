"""Cross-check: our GRPO maths equals TRL's ``GRPOTrainer._compute_loss``, loss and gradient.

TRL's method is driven on a bare trainer object: the loss arithmetic is TRL's own code, and only
the model forward is replaced by the per-token log-probs under test (a real model forward would
check transformers, not GRPO). Gradients are taken with respect to those log-probs on both sides.

Two parts of TRL live inside its 500-line ``_generate_and_score_completions`` and cannot be
called alone: the advantages and the vLLM importance-sampling ratios. For those the expected
values follow TRL 1.16's lines (``grpo_trainer.py`` "sum_then_normalize" and "Compute the
importance sampling ratio when using vLLM") with TRL's own ``nanstd``, and are then fed to
TRL's loss. TRL is in the lock file, so under CI (``CI`` set) a missing TRL fails the module
instead of skipping it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from r1_train.config import TrainConfig
from r1_train.grpo import group_advantages, importance_weights, policy_loss, token_logprobs

if os.environ.get("CI"):
    import trl.trainer.grpo_trainer as trl_grpo  # locked dependency: an ImportError is a failure
    import trl.trainer.utils as trl_utils
else:
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    trl_utils = pytest.importorskip("trl.trainer.utils")

G = 3  # group size


def _batch(seed: int, b: int = 6, t: int = 7, masked_rows: int = 0) -> dict[str, torch.Tensor]:
    """Random log-probs and masks; the first ``masked_rows`` rows train on no token at all."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[:, 0] = 1.0
    mask[:masked_rows] = 0.0
    return {
        "logp": logp,
        "old": logp + 0.3 * torch.randn(b, t, generator=g),
        "ref": logp + 0.2 * torch.randn(b, t, generator=g),
        "sampler": logp + 0.4 * torch.randn(b, t, generator=g),
        "mask": mask,
        "rewards": torch.randint(0, 3, (b,), generator=g).float(),
    }


def _trl_loss(
    logp: torch.Tensor,
    b: dict[str, torch.Tensor],
    adv: torch.Tensor,
    *,
    loss_type: str,
    beta: float = 0.0,
    eps: tuple[float, float] = (0.2, 0.2),
    level: str = "token",
    bias_kl: bool = False,
    is_ratio: torch.Tensor | None = None,
    accumulation: int = 1,
    num_items: torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """TRL's ``_compute_loss`` on one micro-batch, ``logp`` (a leaf) standing in for the model."""
    from accelerate import Accelerator

    trainer: Any = object.__new__(trl_grpo.GRPOTrainer)
    model = torch.nn.Linear(1, 1).train()
    n, width = logp.shape
    fields = {
        "model": model,
        "accelerator": Accelerator(cpu=True),
        "args": SimpleNamespace(
            delta=None, use_bias_correction_kl=bias_kl, steps_per_generation=accumulation
        ),
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": eps[0],
        "epsilon_high": eps[1],
        "importance_sampling_level": level,
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "use_vllm": is_ratio is not None,
        "vllm_importance_sampling_correction": is_ratio is not None,
        "aux_loss_enabled": False,
        "_entropy_bonus_enabled": False,
        "current_gradient_accumulation_steps": accumulation,
        "max_completion_length": max_len or width,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_get_per_token_logps_and_entropies": lambda *a, **k: (logp, torch.zeros_like(logp), None),
    }
    for name, value in fields.items():
        object.__setattr__(trainer, name, value)
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": b["mask"],
        "advantages": adv,
        "old_per_token_logps": b["old"],
        "ref_per_token_logps": b["ref"],
        "num_items_in_batch": b["mask"].sum() if num_items is None else num_items,
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return trl_grpo.GRPOTrainer._compute_loss(trainer, model, inputs)


def _ours_and_trl(
    b: dict[str, torch.Tensor],
    adv: torch.Tensor,
    *,
    loss_type: str,
    beta: float = 0.0,
    eps: tuple[float, float] = (0.2, 0.2),
    level: str = "token",
    bias_kl: bool = False,
    weights: torch.Tensor | None = None,
) -> tuple[tuple[float, torch.Tensor], tuple[float, torch.Tensor]]:
    """(loss, d loss / d logp) for ours and for TRL's on the same batch."""
    mine = b["logp"].clone().requires_grad_()
    ours, _ = policy_loss(
        mine,
        b["old"],
        adv,
        b["mask"],
        loss_type=loss_type,  # type: ignore[arg-type]
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        beta=beta,
        ref_logp=b["ref"],
        max_completion_length=b["logp"].shape[1],
        is_weights=weights,
        importance_sampling_level=level,  # type: ignore[arg-type]
        use_bias_correction_kl=bias_kl,
    )
    ours.backward()
    theirs_logp = b["logp"].clone().requires_grad_()
    theirs = _trl_loss(
        theirs_logp,
        b,
        adv,
        loss_type=loss_type,
        beta=beta,
        eps=eps,
        level=level,
        bias_kl=bias_kl,
        is_ratio=weights,
    )
    theirs.backward()
    assert mine.grad is not None
    assert theirs_logp.grad is not None
    return (ours.item(), mine.grad), (theirs.item(), theirs_logp.grad)


def _assert_same(ours: tuple[float, torch.Tensor], theirs: tuple[float, torch.Tensor]) -> None:
    assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
    assert torch.allclose(ours[1], theirs[1], atol=1e-6), (ours[1] - theirs[1]).abs().max()


CASES = [
    # loss_type, beta, eps, scale, importance_sampling_level, use_bias_correction_kl
    ("grpo", 0.0, (0.2, 0.2), "group", "token", False),
    ("grpo", 0.04, (0.2, 0.2), "batch", "token", False),
    ("grpo", 0.04, (0.2, 0.2), "group", "token", True),
    ("dapo", 0.0, (0.2, 0.28), "group", "token", False),  # DAPO: token-level and clip-higher
    ("dapo", 0.02, (0.2, 0.28), "none", "token", True),
    ("bnpo", 0.01, (0.2, 0.28), "batch", "token", False),
    ("dr_grpo", 0.0, (0.2, 0.2), "none", "token", False),  # Dr. GRPO: no deviation
    ("dr_grpo", 0.03, (0.2, 0.2), "group", "token", False),
    ("grpo", 0.0, (3e-4, 4e-4), "group", "sequence", False),  # GSPO's clip range
    ("grpo", 0.02, (0.2, 0.2), "batch", "sequence", True),
    ("dapo", 0.01, (0.2, 0.2), "none", "sequence", False),
]


@pytest.mark.parametrize(("loss_type", "beta", "eps", "scale", "level", "bias_kl"), CASES)
@pytest.mark.parametrize(("b", "t", "masked_rows"), [(6, 7, 0), (9, 4, 2)])
def test_loss_and_gradient_equal_trl(
    loss_type: str,
    beta: float,
    eps: tuple[float, float],
    scale: str,
    level: str,
    bias_kl: bool,
    b: int,
    t: int,
    masked_rows: int,
) -> None:
    """Every loss type, scale and level, with and without rows that train on nothing."""
    for seed in range(3):
        batch = _batch(seed, b, t, masked_rows)
        adv = group_advantages(batch["rewards"], G, scale=scale)  # type: ignore[arg-type]
        ours, theirs = _ours_and_trl(
            batch, adv, loss_type=loss_type, beta=beta, eps=eps, level=level, bias_kl=bias_kl
        )
        _assert_same(ours, theirs)
        if masked_rows:
            assert not ours[1][:masked_rows].any()  # no token trained: no gradient


def _trl_advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """TRL 1.16's "sum_then_normalize" advantages, a missing (NaN) reward included."""
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale in ("group", "none"):
        std = trl_utils.nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    else:
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale: str) -> None:
    """Finite rewards, then a NaN reward (TRL's unscorable sample) and an infinite one, which we
    treat as TRL treats NaN: advantage 0, the rest normalised among the finite ones."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (12,), generator=g).float()
    ours = group_advantages(rewards, G, scale=scale)  # type: ignore[arg-type]
    assert torch.allclose(ours, _trl_advantages(rewards, scale), atol=1e-6)

    broken = rewards.clone()
    broken[1], broken[7], broken[9], broken[10] = math.nan, math.inf, -math.inf, math.nan
    ours = group_advantages(broken, G, scale=scale)  # type: ignore[arg-type]
    as_missing = torch.where(torch.isfinite(broken), broken, torch.full_like(broken, math.nan))
    assert torch.isfinite(ours).all()
    assert ours[[1, 7, 9, 10]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(ours, _trl_advantages(as_missing, scale), atol=1e-6)


def _trl_is_ratio(b: dict[str, torch.Tensor], mode: str, clip_min: float, clip_max: float):
    """TRL 1.16's vLLM importance-sampling ratio (``[B, T]`` token modes, ``[B, 1]`` sequence)."""
    diff = torch.nan_to_num((b["old"] - b["sampler"]) * b["mask"], nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, max=clip_max)  # TRL's default clip_min None: no lower bound
    return ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), 0.0)


@pytest.mark.parametrize(
    ("ours_mode", "trl_mode"),
    [
        ("tis", "token_truncate"),
        ("mis", "token_mask"),
        ("token_truncate", "token_truncate"),
        ("sequence_truncate", "sequence_truncate"),
        ("sequence_mask", "sequence_mask"),
    ],
)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_importance_corrections_equal_trl(ours_mode: str, trl_mode: str, loss_type: str) -> None:
    """Our weights equal TRL's ratios (our masks keep [1/cap, cap], TRL's [clip_min, clip_max]),
    and TRL's loss weighted by them equals ours. A NaN sampler log-prob gets ratio 1 in both."""
    cap = 2.0
    dropped = kept = 0
    for seed in range(3):
        b = _batch(seed, masked_rows=1)
        b["sampler"][2, 1] = math.nan
        mode: Any = ours_mode
        w = importance_weights(b["old"], b["sampler"], mode, cap, mask=b["mask"])
        assert w is not None
        expected = _trl_is_ratio(b, trl_mode, 1.0 / cap, cap).expand_as(w)
        assert torch.allclose(w, expected, atol=1e-6)
        dropped, kept = dropped + int((w == 0).sum()), kept + int((w > 0).sum())
        adv = group_advantages(b["rewards"], G)
        ours, theirs = _ours_and_trl(b, adv, loss_type=loss_type, beta=0.02, weights=w)
        _assert_same(ours, theirs)
    if trl_mode.endswith("mask"):
        assert dropped
        assert kept


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("micro", [1, 3])
def test_gradient_accumulation_equals_trl(loss_type: str, micro: int) -> None:
    """Micro-batches of ``micro`` sequences, summed over the accumulation window, as TRL does
    it (its ``steps_per_generation`` equal to the accumulation steps, its default): ``bnpo``
    per micro-batch token means over the number of micro-batches, ``dapo`` the whole window's
    tokens. Rows 0 and 1 train on nothing."""
    b = _batch(4, b=6, t=5, masked_rows=2)
    adv = group_advantages(b["rewards"], G)
    steps = 6 // micro
    total_tokens = b["mask"].sum()
    mine = b["logp"].clone().requires_grad_()
    theirs_logp = b["logp"].clone().requires_grad_()
    ours_total = theirs_total = torch.zeros(())
    for i in range(0, 6, micro):
        sl = slice(i, i + micro)
        part = {k: v[sl] for k, v in b.items()}
        ours, _ = policy_loss(
            mine[sl],
            part["old"],
            adv[sl],
            part["mask"],
            loss_type=loss_type,  # type: ignore[arg-type]
            beta=0.02,
            ref_logp=part["ref"],
            num_sequences=6,
            num_tokens=float(total_tokens),
            max_completion_length=5,
            num_micro_batches=steps,
        )
        theirs = _trl_loss(
            theirs_logp[sl],
            part,
            adv[sl],
            loss_type=loss_type,
            beta=0.02,
            accumulation=steps,
            num_items=total_tokens,
            max_len=5,
        )
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
    ours_total.backward()
    theirs_total.backward()
    assert mine.grad is not None
    assert theirs_logp.grad is not None
    _assert_same((ours_total.item(), mine.grad), (theirs_total.item(), theirs_logp.grad))


def test_trainer_dr_grpo_constant_is_the_max_completion_length(tmp_path: Any) -> None:
    """Dr. GRPO's constant is the longest answer the model may write (TRL's
    ``max_completion_length``), not the context length that also holds the prompt."""
    (tmp_path / "config.json").write_text("{}")
    cfg = TrainConfig.model_validate(
        {
            "model": {"path": str(tmp_path)},
            "rollout": {"max_new_tokens": 48, "max_total_tokens": 512},
            "agent": {"max_turns": 2},
            "grpo": {"loss_type": "dr_grpo"},
        }
    )
    assert cfg.max_completion_length == 96
    b = _batch(0, b=6, t=96)
    adv = group_advantages(b["rewards"], G, scale="none")
    ours, _ = policy_loss(
        b["logp"],
        b["old"],
        adv,
        b["mask"],
        loss_type="dr_grpo",
        max_completion_length=cfg.max_completion_length,
    )
    theirs = _trl_loss(b["logp"], b, adv, loss_type="dr_grpo", max_len=96)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_token_logprobs_equal_trl() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = trl_utils.selective_log_softmax(logits / 0.7, tokens)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.7), expected, atol=1e-6)
