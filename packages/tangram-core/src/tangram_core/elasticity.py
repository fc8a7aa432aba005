"""Speed-up models: how an elastic action's duration falls as it gets more units.

Why a model at all: the scheduler hands spare units to the action that gains the most from one
more, T(u) - T(u+1). That needs T(u) for any u from only T(1), which is what the duration
estimator learns. Amdahl's law covers "split the test cases across cores"; a measured table covers
anything else (for example, reward batches across replicas that saturate).
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Amdahl(BaseModel):
    """T(u) = T(1) * (s + (1 - s) / u), with s = 1 - parallel_fraction the serial share."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["amdahl"] = "amdahl"
    parallel_fraction: float = Field(
        0.9, ge=0.0, le=1.0, description="Share of the work that parallelises across units."
    )

    def factor(self, units: int) -> float:
        """T(units) / T(1)."""
        p = self.parallel_fraction
        return (1.0 - p) + p / max(units, 1)


class MeasuredSpeedup(BaseModel):
    """A measured table of T(u)/T(1); units past the table keep its last value."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["table"] = "table"
    factors: dict[int, float] = Field(
        description="units -> T(units)/T(1); must hold 1 -> 1.0 and not increase with units."
    )

    @field_validator("factors")
    @classmethod
    def _monotone(cls, factors: dict[int, float]) -> dict[int, float]:
        if factors.get(1) != 1.0:
            raise ValueError(f"factors must map 1 -> 1.0 (T(1)/T(1)); got {factors.get(1)!r}")
        keys = sorted(factors)
        if keys[0] < 1:
            raise ValueError(f"units must be >= 1; got {keys[0]}")
        values = [factors[k] for k in keys]
        if any(b > a for a, b in itertools.pairwise(values)):
            raise ValueError(
                f"factors must not increase with units (more units never slow an action); "
                f"got {dict(zip(keys, values, strict=True))}"
            )
        if values[-1] <= 0:
            raise ValueError(f"factors must be > 0; got {values[-1]}")
        return dict(zip(keys, values, strict=True))

    def factor(self, units: int) -> float:
        best = 1.0
        for k in sorted(self.factors):
            if k > units:
                break
            best = self.factors[k]
        return best


SpeedupModel = Annotated[Amdahl | MeasuredSpeedup, Field(discriminator="kind")]


class Elasticity(BaseModel):
    """How many units an action may run on, and how its duration scales with them.

    A rigid action has ``min_units == max_units`` (the default, 1 and 1).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_units: int = Field(1, ge=1, description="Fewest units the action can start on.")
    max_units: int = Field(1, ge=1, description="Most units the action can use.")
    speedup: SpeedupModel = Field(default_factory=Amdahl)

    @field_validator("max_units")
    @classmethod
    def _range(cls, max_units: int, info: object) -> int:
        data = getattr(info, "data", {})
        min_units = data.get("min_units", 1)
        if max_units < min_units:
            raise ValueError(
                f"max_units ({max_units}) must be >= min_units ({min_units}); "
                f"set max_units to at least {min_units}"
            )
        return max_units

    @property
    def rigid(self) -> bool:
        return self.min_units == self.max_units

    def factor(self, units: int) -> float:
        """T(units) / T(1), for units clamped to [min_units, max_units]."""
        return self.speedup.factor(min(max(units, self.min_units), self.max_units))
