"""Online duration estimates per action kind, learned from completed actions.

Why: shortest-remaining-work-first needs each action's duration before it runs, and durations
are unknown in advance. We learn T(1) per unit of ``size`` for each kind (seconds per test case,
per thousand tokens, ...) from what completes, starting from a prior so that the first actions
of a new kind are ordered sensibly. A kind's estimate is a running mean that becomes an
exponential moving average once ``1/decay`` samples have arrived, so it tracks drift (a policy
whose code gets slower as training goes on) without forgetting after one outlier.

Accuracy is tracked the honest way: each completion is scored against the estimate made
*before* it was observed.

An action may carry its caller's own estimate (``estimated_t1``). The scheduler asks
:meth:`DurationEstimator.estimate_spec`, which uses the caller's figure until ours has measured
better on that kind (mean absolute log error over at least ``min_compare`` completions that
carried both), and then ours. Payload-aware estimates live in :mod:`.payload_estimator`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tangram_core.scheduler import ActionSpec


@dataclass(slots=True)
class _KindState:
    mean: float  # seconds of T(1) per unit of size
    weight: float  # effective number of samples behind `mean`, prior included
    count: int = 0
    abs_pct_err_sum: float = 0.0
    log_ratio_sum: float = 0.0


@dataclass(slots=True)
class _CallerScore:
    """Caller's estimate against ours on one kind, over completions that carried both."""

    n: int = 0
    caller_log_err: float = 0.0  # sums of |log(estimate / actual)|
    own_log_err: float = 0.0


@dataclass(frozen=True, slots=True)
class EstimatorAccuracy:
    """How good the estimates for one kind have been, measured before each observation."""

    kind: str
    count: int
    mape: float  # mean absolute percentage error, |est - actual| / actual
    geo_bias: float  # exp(mean(log(est / actual))): > 1 means we over-estimate


class DurationEstimator:
    """Per-kind online estimate of an action's single-unit duration, T(1)."""

    def __init__(
        self,
        prior_s: float = 1.0,
        *,
        prior_weight: float = 2.0,
        decay: float = 0.02,
        priors: Mapping[str, float] | None = None,
    ) -> None:
        if prior_s <= 0:
            raise ValueError(f"prior_s ({prior_s}) must be > 0 seconds")
        if not 0 < decay <= 1:
            raise ValueError(f"decay ({decay}) must be in (0, 1]; 0.02 averages ~50 samples")
        if prior_weight < 0:
            raise ValueError(f"prior_weight ({prior_weight}) must be >= 0")
        self.prior_s = prior_s
        self.prior_weight = prior_weight
        self.max_weight = 1.0 / decay
        self._priors = dict(priors or {})
        self._kinds: dict[str, _KindState] = {}
        self._caller: dict[str, _CallerScore] = {}
        self._own_better: set[str] = set()  # kinds where ours beat the callers' estimates
        self.min_compare = 20

    def _state(self, kind: str) -> _KindState:
        state = self._kinds.get(kind)
        if state is None:
            state = _KindState(mean=self._priors.get(kind, self.prior_s), weight=self.prior_weight)
            self._kinds[kind] = state
        return state

    def estimate(self, kind: str, size: float = 1.0) -> float:
        """Estimated T(1) in seconds for an action of ``kind`` and ``size``."""
        state = self._kinds.get(kind)
        mean = state.mean if state is not None else self._priors.get(kind, self.prior_s)
        return mean * size

    def observe(self, kind: str, size: float, t1_seconds: float) -> None:
        """Learn from a completed action whose single-unit-equivalent duration was ``t1_seconds``.

        Callers convert a run on u units back to T(1) with the action's speed-up model.
        """
        if not (t1_seconds > 0 and size > 0) or math.isinf(t1_seconds):
            return  # a zero-length or failed measurement carries no information
        state = self._state(kind)
        self._score(state, state.mean * size, t1_seconds)
        self._learn_mean(state, size, t1_seconds)

    @staticmethod
    def _score(state: _KindState, est: float, t1_seconds: float) -> None:
        state.count += 1
        state.abs_pct_err_sum += abs(est - t1_seconds) / t1_seconds
        state.log_ratio_sum += math.log(est / t1_seconds)

    def _learn_mean(self, state: _KindState, size: float, t1_seconds: float) -> None:
        state.weight = min(state.weight + 1.0, self.max_weight)
        state.mean += (t1_seconds / size - state.mean) / max(state.weight, 1.0)

    # -- whole actions: the scheduler's entry points ---------------------------------------------

    def own_estimate(self, spec: ActionSpec) -> float:
        """Our estimate of T(1) for ``spec``, ignoring the caller's; subclasses use more of it."""
        return self.estimate(spec.kind, spec.size)

    def estimate_spec(self, spec: ActionSpec) -> float:
        """The estimate the scheduler ranks by: the caller's, unless ours measured better."""
        caller = spec.estimated_t1
        if caller is not None and spec.kind not in self._own_better:
            return caller
        return self.own_estimate(spec)

    def observe_spec(self, spec: ActionSpec, t1_seconds: float) -> None:
        """Learn from a completed action, and score the caller's estimate against ours."""
        if not (t1_seconds > 0 and spec.size > 0) or math.isinf(t1_seconds):
            return
        own = self.own_estimate(spec)  # made before learning from this action
        caller = spec.estimated_t1
        if caller is not None:
            score = self._caller.get(spec.kind)
            if score is None:
                score = self._caller[spec.kind] = _CallerScore()
            score.n += 1
            score.caller_log_err += abs(math.log(caller / t1_seconds))
            score.own_log_err += abs(math.log(own / t1_seconds))
            if score.n >= self.min_compare and score.own_log_err < score.caller_log_err:
                self._own_better.add(spec.kind)
            else:
                self._own_better.discard(spec.kind)
        self._learn_spec(spec, t1_seconds, own)

    def _learn_spec(self, spec: ActionSpec, t1_seconds: float, own: float) -> None:
        """Score ``own`` (our estimate before this observation), then learn."""
        state = self._state(spec.kind)
        self._score(state, own, t1_seconds)
        self._learn_mean(state, spec.size, t1_seconds)

    def caller_comparison(self) -> dict[str, dict[str, float]]:
        """Per kind: mean |log error| of the callers' estimates and of ours, and which is used."""
        return {
            kind: {
                "n": s.n,
                "caller_mean_abs_log_err": s.caller_log_err / s.n,
                "own_mean_abs_log_err": s.own_log_err / s.n,
                "uses_own": float(kind in self._own_better),
            }
            for kind, s in self._caller.items()
            if s.n
        }

    def accuracy(self) -> dict[str, EstimatorAccuracy]:
        return {
            kind: EstimatorAccuracy(
                kind=kind,
                count=s.count,
                mape=s.abs_pct_err_sum / s.count,
                geo_bias=math.exp(s.log_ratio_sum / s.count),
            )
            for kind, s in self._kinds.items()
            if s.count
        }
