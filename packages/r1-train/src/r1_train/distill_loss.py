"""The maths of logit distillation, as pure functions of logits (no model, no I/O).

Per token, over the vocabulary, with ``S`` the student's and ``T`` the teacher's distribution
after dividing both logits by ``temperature``:

* ``forward_kl``: KL(T || S) = sum T (log T - log S). Mean-seeking: the student must put mass
  wherever the teacher does (classic knowledge distillation, Hinton et al.).
* ``reverse_kl``: KL(S || T). Mode-seeking: the student is punished for mass where the teacher
  has none, and may drop some of the teacher's modes (MiniLLM, on-policy distillation).
* ``mix``: (1 - beta) KL(T || S) + beta KL(S || T), a straight interpolation of the two.
* ``jsd``: TRL's generalized Jensen-Shannon divergence (``GKDTrainer.generalized_jsd_loss``):
  with the mixture M = (1 - beta) S + beta T, beta KL(T || M) + (1 - beta) KL(S || M); at
  beta 0 and 1 it is, as in TRL, exactly ``forward_kl`` and ``reverse_kl``.

TRL's ``beta`` has the same meaning here (0: forward KL, 1: reverse KL). The loss of a step is
the sum over its trained (completion) tokens divided by the whole step's trained-token count,
TRL's ``batchmean`` over the labelled tokens; passing the step's count to every micro-batch
makes the gradient independent of the split.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossName = Literal["forward_kl", "reverse_kl", "mix", "jsd"]
LOSSES: tuple[LossName, ...] = ("forward_kl", "reverse_kl", "mix", "jsd")


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last axis from log-probabilities; 0 log 0 is 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss: LossName,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence ``[...]`` between ``[..., V]`` logits, in fp32.

    The teacher's logits carry no gradient (they come from a frozen model); the student's
    gradient flows through every term, including the mixture of ``jsd``, as in TRL."""
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta ({beta}) must be within [0, 1]")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; the models must share a vocabulary"
        )
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return _kl(t, s)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return _kl(s, t)
    if loss == "mix":
        return (1.0 - beta) * _kl(t, s) + beta * _kl(s, t)
    if loss == "jsd":
        m = torch.logsumexp(
            torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0
        )  # log((1 - beta) S + beta T)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    raise ValueError(f"unknown distillation loss {loss!r}; choose one of {list(LOSSES)}")
