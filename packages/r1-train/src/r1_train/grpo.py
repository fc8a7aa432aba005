"""GRPO maths as pure functions over tensors: advantages, log-probs, KL and the clipped loss.

Kept apart from the trainer so that every option can be checked by hand and against TRL. The
loss functions take the *global* denominators (sequences and tokens in the whole optimisation
batch) so that gradient accumulation is exact: the sum of the micro-batch losses equals the
loss of the whole batch, whatever the split (``bnpo`` excepted: see below).

Loss types (the names TRL uses, so configs carry over):

* ``grpo``: R1's objective. Each sequence's token mean, then the mean over sequences.
* ``dapo``: DAPO's token-level normalisation. The sum over all tokens of the batch, divided by
  the number of tokens in the whole batch, so long answers weigh by their length and the split
  into micro-batches does not change the loss.
* ``bnpo``: TRL's meaning: each micro-batch's token sum over its *own* token count, divided by
  the number of micro-batches. With one micro-batch it equals ``dapo``; with several, micro-batches
  with few tokens weigh more per token. Kept for configs that come from TRL; prefer ``dapo``.
* ``dr_grpo``: Dr. GRPO. The sum over tokens divided by ``sequences x max_completion_length``,
  a constant (the most tokens the model may write, not counting the prompt), which removes the
  length bias. Pair it with ``scale="none"`` advantages.

``importance_sampling_level="sequence"`` is GSPO: one ratio per sequence, the exponential of the
mean token log-ratio, clipped as a whole.

Off-policy correction (:func:`importance_weights`): the sampler (vLLM, maybe some policy
versions behind in asynchronous training, and never numerically equal to the trainer) drew the
tokens, so the surrogate is reweighted by ``pi_trainer / pi_sampler``: per token truncated
(``tis`` = TRL's ``token_truncate``) or masked (``mis`` = ``token_mask``), or per sequence (the
product of the token ratios) truncated (``sequence_truncate``) or masked (``sequence_mask``).
The weight multiplies the surrogate, not the KL term, as TRL does.

Non-finite numbers: a NaN or infinite reward is a broken sample, not a signal. It gets advantage
0 and the rest of its group is normalised among its finite rewards (TRL's rule for a missing
reward); the trainer counts it, names it and stops past ``grpo.max_nonfinite_fraction``. A
non-finite sampler log-prob gets no correction (weight 1, TRL's rule for a missing one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1_train.grpo_options import AdvantageScale, ImportanceSamplingLevel, ISCorrection, LossType

_TRUNCATE = ("tis", "token_truncate", "sequence_truncate")
_SEQUENCE = ("sequence_truncate", "sequence_mask")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased deviation over the non-NaN entries (NaN where fewer than two)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


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
    A NaN or infinite reward gets advantage 0 and is left out of its group's mean and deviation
    (and the batch's), so one broken reward cannot turn the whole group, or batch, into NaN.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [num_groups * group_size]; got {tuple(rewards.shape)}"
        )
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size ({group_size}) must divide the number of rewards ({rewards.numel()})"
        )
    # Non-finite rewards become NaN, drop out of every mean and deviation, and get advantage 0.
    rewards = torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, float("nan")))
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred.nan_to_num(nan=0.0)
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (a deviation of one sample)")
        std = _nanstd(grouped, dim=1).repeat_interleave(group_size)
    else:
        one = rewards.numel() == 1
        std = torch.zeros_like(rewards) if one else _nanstd(rewards).expand_as(rewards)
    return (centred / (std + eps)).nan_to_num(nan=0.0)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling: ``[num_groups]`` bools, False where all rewards are equal.

    A group whose rewards are all equal has zero advantage everywhere and only dilutes the
    batch; the trainer drops it (and may sample more prompts to refill the batch). Only finite
    rewards count: a group whose finite rewards differ keeps its signal despite a broken one.
    """
    grouped = rewards.view(-1, group_size)
    finite = torch.isfinite(grouped)
    high = torch.where(finite, grouped, torch.full_like(grouped, -torch.inf)).max(dim=1).values
    low = torch.where(finite, grouped, torch.full_like(grouped, torch.inf)).min(dim=1).values
    return finite.any(dim=1) & (high - low > 0)


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
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Weights ``pi_trainer / pi_sampler`` (``[B, T]``) for the surrogate, or None for ``none``.

    Truncation (``tis``/``token_truncate``, ``sequence_truncate``) caps the weight at ``cap``:
    bounded variance, a small bias. Masking (``mis``/``token_mask``, ``sequence_mask``) keeps
    the exact weight where it lies in ``[1/cap, cap]`` and zeroes it elsewhere: unbiased on what
    it keeps, and it drops where sampler and trainer disagree most, often numerical outliers.
    Sequence modes use one ratio per sequence, the product of its token ratios over ``mask``
    (TRL's definition), so one far-off token can drop the whole sequence. Tokens outside
    ``mask`` (padding, tool outputs) get ratio 1.

    A non-finite sampler log-prob (or a non-finite difference) contributes ratio 1, as TRL
    treats a missing one: counting and reporting it is the caller's job (:func:`nonfinite`)."""
    if mode == "none":
        return None
    if cap <= 1.0:
        raise ValueError(f"the importance-sampling cap must be above 1, got {cap}")
    diff = trainer_logp.detach() - sampler_logp.detach()
    diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
    if mask is not None:  # untrained tokens: ratio 1, and no part in a sequence's product
        diff = diff * mask.to(diff.dtype)
    if mode in _SEQUENCE:
        diff = diff.sum(-1, keepdim=True).expand_as(diff)
    elif mode not in ("tis", "mis", "token_truncate", "token_mask"):
        raise ValueError(
            f"unknown importance-sampling correction {mode!r}; use none, tis, mis, "
            "token_truncate, token_mask, sequence_truncate or sequence_mask"
        )
    ratio = torch.exp(diff)
    if mode in _TRUNCATE:
        return ratio.clamp(max=cap)
    keep = (ratio >= 1.0 / cap) & (ratio <= cap)
    return torch.where(keep, ratio, torch.zeros_like(ratio))


def nonfinite(values: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """How many entries of ``values`` (where ``mask`` is set) are NaN or infinite."""
    bad = ~torch.isfinite(values)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    return int(bad.sum())


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
    an unbiased, non-negative estimate of ``KL(sampler || trainer)``. Non-finite log-probs are
    left out (they are counted separately)."""
    with torch.no_grad():
        m = mask.to(torch.bool) & torch.isfinite(sampler_logp) & torch.isfinite(trainer_logp)
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
    importance_sampling_level: ImportanceSamplingLevel = "token",
    use_bias_correction_kl: bool = False,
    num_micro_batches: int = 1,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped GRPO surrogate (to minimise), plus ``beta`` times the k3 KL, on a micro-batch.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``[B, T]`` over completion tokens;
    ``mask`` is 0 on padding and on tool observations (tokens the policy did not write).
    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``.

    ``num_sequences`` / ``num_tokens`` are the whole optimisation batch's sequence count and
    masked-token count: pass them when the batch is split into micro-batches, so that the
    micro-batch losses sum to the batch loss. They default to this micro-batch's own.
    ``num_micro_batches`` is used by ``bnpo`` only, which (as in TRL) normalises by the
    micro-batch's own tokens and then by the number of micro-batches.
    ``epsilon_high`` defaults to ``epsilon_low``; a larger one is DAPO's clip-higher.
    ``importance_sampling_level="sequence"`` (GSPO) replaces the token ratio by the sequence's
    ``exp(mean token log-ratio)``, clipped per sequence.
    ``is_weights`` (``[B, T]``, from :func:`importance_weights`) reweights the surrogate per
    token for off-policy samples. ``use_bias_correction_kl`` multiplies the k3 KL by the
    (differentiable) policy ratio, which makes its gradient the unbiased reverse-KL gradient
    (DeepSeek-V3.2; TRL's option of that name); it changes the gradient even on-policy.
    """
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp, the reference model's log-probs")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            "use token or sequence"
        )
    ratio = torch.exp(log_ratio)  # [B, T], or [B, 1] at sequence level
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    per_token = per_token.expand_as(mask)

    n_seq = num_sequences if num_sequences is not None else logp.shape[0]
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_seq.sum() / n_seq
    elif loss_type == "dapo":
        n_tok = num_tokens if num_tokens is not None else float(mask.sum().clamp(min=1.0))
        loss = (per_token * mask).sum() / max(n_tok, 1.0)
    elif loss_type == "bnpo":
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / num_micro_batches
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (its constant norm)")
        loss = (per_token * mask).sum() / (n_seq * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, bnpo, dapo or dr_grpo")

    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        r = ratio.expand_as(mask)
        a = adv.expand_as(mask)
        low = ((r < 1 - epsilon_low) & (a < 0)).to(mask.dtype)
        high = ((r > 1 + eps_high) & (a > 0)).to(mask.dtype)
        stats = LossStats(
            kl=float((kl * mask).sum() / count),
            clip_low=float((low * mask).sum() / count),
            clip_high=float((high * mask).sum() / count),
            ratio_max=float((r * mask).max()) if mask.any() else 1.0,
            tokens=int(mask.sum()),
        )
    return loss, stats
