"""The policy for NaN and infinite numbers on their way into the loss: count, name, or stop.

A non-finite reward or sampler log-prob is a bug upstream (a reward function, a reward model,
the engine), never a learning signal. One of them must not turn the group's advantages, the
loss and then every weight into NaN, and it must not pass unnoticed either. Below
``grpo.max_nonfinite_fraction`` the maths gives it no weight (advantage 0, importance weight 1;
see :mod:`r1_train.grpo`) and the step's metrics count it; past it the run stops here, naming
the samples and reward components, before anything is trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many NaN or infinite inputs to train on: a broken reward or engine, not a signal."""


class _Scored(Protocol):
    @property
    def id(self) -> str: ...

    reward: float | None
    reward_parts: dict[str, float]


def describe(t: _Scored) -> str:
    """``task/gGsS (reward nan; math=nan, format=1.0)``: the sample and its bad components."""
    bad = [f"{k}={v}" for k, v in sorted(t.reward_parts.items()) if not math.isfinite(v)]
    parts = ", ".join(bad) if bad else "no component is non-finite: check rewards.weights"
    return f"{t.id} (reward {t.reward}; {parts})"


def check_rewards(trajs: Sequence[_Scored], max_fraction: float) -> int:
    """Count the scored trajectories whose reward is NaN or infinite and log each by name.

    Returns the count; raises :class:`NonFiniteError` when it exceeds ``max_fraction`` of the
    scored ones (the fraction is strict: 0 stops on the first)."""
    scored = [t for t in trajs if t.reward is not None]
    bad = [t for t in scored if not math.isfinite(t.reward)]  # type: ignore[arg-type]
    if not bad:
        return 0
    names = "; ".join(describe(t) for t in bad)
    if len(bad) / len(scored) > max_fraction:
        raise NonFiniteError(
            f"{len(bad)} of {len(scored)} rewards are NaN or infinite, above "
            f"grpo.max_nonfinite_fraction ({max_fraction}): {names}. Fix the reward function, "
            "or raise grpo.max_nonfinite_fraction to train on with advantage 0 for them"
        )
    log.warning(
        "%d of %d rewards are NaN or infinite; they get advantage 0: %s",
        len(bad),
        len(scored),
        names,
    )
    return len(bad)
