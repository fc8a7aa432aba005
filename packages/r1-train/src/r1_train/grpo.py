"""GRPO maths as pure functions over tensors: advantages, log-probs, KL and the clipped loss.

Kept apart from the trainer so that every option can be checked by hand and against TRL. The
loss functions take the *global* denominators (sequences and tokens in the whole optimisation
batch) so that gradient accumulation is exact: the sum of the micro-batch losses equals the
loss of the whole batch, whatever the split.

Loss types (the names TRL uses, so configs carry over):

* ``grpo``: R1's objective. Each sequence's token mean, then the mean over sequences.
* ``bnpo`` / ``dapo``: DAPO's token-level normalisation. The sum over all tokens of the batch,
  divided by the number of tokens, so long answers weigh by their length.
* ``dr_grpo``: Dr. GRPO. The sum over tokens divided by ``sequences x max_completion_length``,
  a constant, which removes the length bias. Pair it with ``scale="none"`` advantages.

Off-policy correction (:func:`importance_weights`): the sampler (vLLM, maybe some policy
versions behind in asynchronous training, and never numerically equal to the trainer) drew the
tokens, so the surrogate is reweighted per token by ``pi_trainer / pi_sampler``: truncated
(``tis``, the weight capped) or masked (``mis``, tokens outside ``[1/cap, cap]`` dropped). The
weight multiplies the surrogate, not the KL term, as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ISCorrection = Literal["none", "tis", "mis"]
AdvantageScale = Literal["group", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO's advantage: each reward minus its group's mean, over a standard deviation.

    ``rewards`` is ``[num_groups * group_size]``, groups contiguous. ``scale`` picks the
    deviation: the group's (R1), the batch's (more robust for small groups), or none
    (Dr. GRPO). Deviations are unbiased (Bessel), as TRL's are, so numbers match across tools.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [num_groups * group_size]; got {tuple(rewards.shape)}"
        )
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size ({group_size}) must divide the number of rewards ({rewards.numel()})"
        )
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (a deviation of one sample)")
        std = grouped.std(dim=1).repeat_interleave(group_size)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return centred / (std + eps)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling: ``[num_groups]`` bools, False where all rewards are equal.

    A group whose rewards are all equal has zero advantage everywhere and only dilutes the
    batch; the trainer drops it (and may sample more prompts to refill the batch).
    """
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0


def overlong_penalty(
    lengths: torch.Tensor, *, max_length: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward (<= 0).

    Zero up to ``max_length - buffer`` tokens, then falling linearly to ``-penalty`` at
    ``max_length`` (and staying there beyond it).
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer ({buffer}) must be in (0, max_length={max_length}]")
    over = (lengths.float() - (max_length - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * over / buffer


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """``log p(tokens[b, t])`` under ``logits[b, t]`` (already aligned: logits at t predict t).

    The temperature must be the sampler's, or the ratio to vLLM's log-probs is biased. Computed
    row by row through ``log_softmax`` in fp32, which costs one ``[T, V]`` buffer per sequence
    rather than one for the whole batch.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} are not aligned"
        )
    out = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)
        out.append(logp.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The "k3" estimator of KL(pi || pi_ref) per token: unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def importance_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mode: ISCorrection,
    cap: float,
) -> torch.Tensor | None:
    """Per-token weights ``pi_trainer / pi_sampler`` for the surrogate, or None for ``none``.

    ``tis`` caps the weight at ``cap`` (truncated importance sampling: bounded variance, a small
    bias). ``mis`` keeps the exact weight where it lies in ``[1/cap, cap]`` and zeroes the token
    elsewhere (masked importance sampling: unbiased on what it keeps, and it drops the tokens
    where sampler and trainer disagree most, often numerical outliers)."""
    if mode == "none":
        return None
    if cap <= 1.0:
        raise ValueError(f"the importance-sampling cap must be above 1, got {cap}")
    ratio = torch.exp(trainer_logp.detach() - sampler_logp.detach())
    if mode == "tis":
        return ratio.clamp(max=cap)
    if mode == "mis":
        return ratio * ((ratio >= 1.0 / cap) & (ratio <= cap)).to(ratio.dtype)
    raise ValueError(f"unknown importance-sampling correction {mode!r}; use none, tis or mis")


@dataclass(frozen=True)
class Mismatch:
    """How far the sampler's token log-probs are from the trainer's, over trained tokens."""

    kl: float  # k3 estimate of KL(sampler || trainer), token mean
    ratio_max: float  # max of pi_trainer / pi_sampler
    ratio_min: float
    off_fraction: float  # tokens whose ratio lies outside [1/cap, cap]


def sampler_mismatch(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> Mismatch:
    """Sampler-trainer mismatch statistics, logged every step (with or without correction).

    The tokens were drawn by the sampler, so ``E_s[r - 1 - log r]`` with ``r = pi_t / pi_s`` is
    an unbiased, non-negative estimate of ``KL(sampler || trainer)``."""
    with torch.no_grad():
        m = mask.to(torch.bool)
        if not m.any():
            return Mismatch(0.0, 1.0, 1.0, 0.0)
        log_r = (trainer_logp - sampler_logp)[m].double()
        r = torch.exp(log_r)
        off = ((r < 1.0 / cap) | (r > cap)).double().mean()
        return Mismatch(
            kl=float((r - 1 - log_r).mean()),
            ratio_max=float(r.max()),
            ratio_min=float(r.min()),
            off_fraction=float(off),
        )


@dataclass(frozen=True)
class LossStats:
    """What one loss evaluation observed, as plain floats for logging (token means)."""

    kl: float
    clip_low: float
    clip_high: float
    ratio_max: float
    tokens: int

    @property
    def clip_fraction(self) -> float:
        return self.clip_low + self.clip_high


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    max_completion_length: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped GRPO surrogate (to minimise), plus ``beta`` times the k3 KL, on a micro-batch.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``[B, T]`` over completion tokens;
    ``mask`` is 0 on padding and on tool observations (tokens the policy did not write).
    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``.

    ``num_sequences`` / ``num_tokens`` are the whole optimisation batch's sequence count and
    masked-token count: pass them when the batch is split into micro-batches, so that the
    micro-batch losses sum to the batch loss. They default to this micro-batch's own.
    ``epsilon_high`` defaults to ``epsilon_low``; a larger one is DAPO's clip-higher.
    ``is_weights`` (``[B, T]``, from :func:`importance_weights`) reweights the surrogate per
    token for off-policy samples.
    """
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp, the reference model's log-probs")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl

    n_seq = num_sequences if num_sequences is not None else logp.shape[0]
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_seq.sum() / n_seq
    elif loss_type in ("bnpo", "dapo"):
        n_tok = num_tokens if num_tokens is not None else float(mask.sum().clamp(min=1.0))
        loss = (per_token * mask).sum() / max(n_tok, 1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (its constant norm)")
        loss = (per_token * mask).sum() / (n_seq * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, bnpo, dapo or dr_grpo")

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        stats = LossStats(
            kl=float((kl * mask).sum() / count),
            clip_low=float((low * mask).sum() / count),
            clip_high=float((high * mask).sum() / count),
            ratio_max=float((ratio * mask).max()) if mask.any() else 1.0,
            tokens=int(mask.sum()),
        )
    return loss, stats
