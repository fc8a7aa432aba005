"""Payload-aware duration estimates: an online log-linear model per kind, on the action's features.

Why: per-kind means are poor where one kind spans three orders of magnitude (sandbox runs from
50 ms to 40 s): shortest-estimated-work-first then orders such actions by their kind alone. An
action already carries numbers that predict its duration (its test count, code size, input and
output tokens). Durations are roughly log-normal and multiplicative in such sizes, so we
fit, per kind, ``log(T(1) / size) = beta . x`` with ``x = (1, log1p(feature) ...)`` by
recursive least squares with a forgetting factor (exact online least squares that tracks drift,
O(d^2) per completion for d <= a handful of features), and predict the conditional *mean*
``exp(beta . x + s^2 / 2)``, with ``s^2`` the recent squared residual in log space. The mean,
not the median, because ranking by expected work is what minimises expected completion times.

Until a kind has ``min_observations`` completions (and at least three per coefficient), the
per-kind running mean of :class:`~tangram_core.estimator.DurationEstimator` answers instead.
Accuracy is reported as before, against the estimate in force before each observation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tangram_core.estimator import DurationEstimator
from tangram_core.scheduler import ActionSpec

__all__ = ["PayloadEstimator"]


@dataclass(slots=True)
class _Regression:
    """Recursive least squares on log durations, for one kind."""

    names: tuple[str, ...]  # the features this kind's model uses, fixed at its first completion
    beta: list[float]
    p: list[list[float]]  # the inverse information matrix, scaled
    n: int = 0
    resid_var: float = 1.0  # running mean of squared log residuals
    ready: bool = False  # enough completions to answer instead of the per-kind mean
    scale: float = 1.0  # featureless kinds: the estimate per unit of size, cached


class PayloadEstimator(DurationEstimator):
    """Per-kind online log-linear regression on action features, with a per-kind fallback."""

    def __init__(
        self,
        prior_s: float = 1.0,
        *,
        min_observations: int = 12,
        forgetting: float = 0.998,
        max_features: int = 6,
        priors: Mapping[str, float] | None = None,
        **kwargs: float,
    ) -> None:
        super().__init__(prior_s, priors=priors, **kwargs)
        if not 0.9 <= forgetting <= 1.0:
            raise ValueError(
                f"forgetting ({forgetting}) must be in [0.9, 1]; 0.998 remembers ~500 completions"
            )
        if min_observations < 1:
            raise ValueError(f"min_observations ({min_observations}) must be >= 1")
        self.min_observations = min_observations
        self.forgetting = forgetting
        self.max_features = max_features
        self._models: dict[str, _Regression] = {}

    @staticmethod
    def _x(model: _Regression, spec: ActionSpec) -> list[float]:
        x = [1.0]
        if model.names:
            values = dict(spec.features)
            x.extend(math.log1p(values.get(name, 0.0)) for name in model.names)
        return x

    def own_estimate(self, spec: ActionSpec) -> float:
        model = self._models.get(spec.kind)
        if model is None or not model.ready:
            return self.estimate(spec.kind, spec.size)  # per-kind fallback
        if not model.names:
            return spec.size * model.scale  # no features: a log-space mean, kept up to date
        x = self._x(model, spec)
        log_t = sum(b * v for b, v in zip(model.beta, x, strict=True))
        return spec.size * math.exp(min(log_t + 0.5 * min(model.resid_var, 4.0), 30.0))

    def _learn_spec(self, spec: ActionSpec, t1_seconds: float, own: float) -> None:
        state = self._kinds.get(spec.kind) or self._state(spec.kind)
        # _score and _learn_mean, inlined: this runs once per completion on the hot path.
        state.count += 1
        state.abs_pct_err_sum += abs(own - t1_seconds) / t1_seconds
        state.log_ratio_sum += math.log(own / t1_seconds)
        state.weight = min(state.weight + 1.0, self.max_weight)
        state.mean += (t1_seconds / spec.size - state.mean) / max(state.weight, 1.0)
        model = self._models.get(spec.kind)
        if model is None:
            names = tuple(name for name, _ in spec.features[: self.max_features])
            d = 1 + len(names)
            p = [[100.0 if i == j else 0.0 for j in range(d)] for i in range(d)]
            model = _Regression(names, [math.log(state.mean)] + [0.0] * (d - 1), p)
            self._models[spec.kind] = model
        y = math.log(t1_seconds / spec.size)
        if model.names:
            self._update(model, self._x(model, spec), y)
        else:
            self._update_scalar(model, y)

    def _update_scalar(self, m: _Regression, y: float) -> None:
        """:meth:`_update` for d = 1 (intercept only), in scalars: the common featureless kind."""
        lam, p = self.forgetting, m.p[0][0]
        gain = p / (lam + p)
        resid = y - m.beta[0]
        m.beta[0] += gain * resid
        m.p[0][0] = (p - gain * p) / lam
        self._after(m, resid)

    def _update(self, m: _Regression, x: list[float], y: float) -> None:
        """One recursive-least-squares step with forgetting factor ``lam``."""
        lam, d = self.forgetting, len(x)
        px = [sum(row[j] * x[j] for j in range(d)) for row in m.p]
        denom = lam + sum(x[i] * px[i] for i in range(d))
        resid = y - sum(b * v for b, v in zip(m.beta, x, strict=True))
        gain = [v / denom for v in px]
        m.beta = [b + g * resid for b, g in zip(m.beta, gain, strict=True)]
        m.p = [[(m.p[i][j] - gain[i] * px[j]) / lam for j in range(d)] for i in range(d)]
        self._after(m, resid)

    def _after(self, m: _Regression, resid: float) -> None:
        m.n += 1
        if not m.ready and m.n >= max(self.min_observations, 3 * len(m.beta)):
            m.ready = True
        # The residual before the update: an honest, out-of-sample spread for the mean.
        w = 1.0 / min(m.n, 200)
        m.resid_var += w * (resid * resid - m.resid_var)
        if not m.names:
            m.scale = math.exp(min(m.beta[0] + 0.5 * min(m.resid_var, 4.0), 30.0))

    def features_used(self) -> dict[str, tuple[str, ...]]:
        """Per kind, the features its model learns from (beyond the intercept)."""
        return {kind: m.names for kind, m in self._models.items()}
