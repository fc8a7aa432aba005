"""One rule-reward request, validated at the edge, and the pure function that scores it.

Servers (Ray Serve, HTTP) and in-process callers share this: the request model is the contract,
and :func:`score_rules` is what every replica runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tangram_reward.rules.countdown_reward import countdown_score
from tangram_reward.rules.format_reward import r1_format
from tangram_reward.rules.language_reward import language_consistency
from tangram_reward.rules.math_reward import math_accuracy

Rule = Literal["math", "format", "language", "countdown"]


class RuleRequest(BaseModel):
    """Score one response with one or more rules; the reward is their weighted sum."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    response: str = Field(min_length=1, description="The model's full response.")
    reference: str | None = Field(None, description="Ground-truth answer (needed by 'math').")
    rules: tuple[Rule, ...] = Field(("math",), min_length=1)
    weights: dict[Rule, float] | None = Field(None, description="Per-rule weight; default 1.")
    think_prefilled: bool = Field(False, description="The prompt already opened <think>.")
    language: str = "en"
    numbers: tuple[int, ...] = Field((), max_length=64, description="'countdown': the numbers.")
    target: int | None = Field(None, description="'countdown': the value to reach.")

    @model_validator(mode="after")
    def _needs_reference(self) -> RuleRequest:
        if "math" in self.rules and not (self.reference and self.reference.strip()):
            raise ValueError("rule 'math' needs a non-empty 'reference' answer")
        if "countdown" in self.rules and (not self.numbers or self.target is None):
            raise ValueError("rule 'countdown' needs 'numbers' and 'target'")
        return self


class RuleScore(BaseModel):
    model_config = ConfigDict(frozen=True)
    reward: float
    scores: dict[Rule, float]


def score_rules(req: RuleRequest) -> RuleScore:
    scores: dict[Rule, float] = {}
    for rule in req.rules:
        if rule == "math":
            scores[rule] = math_accuracy(req.response, req.reference or "")
        elif rule == "countdown":
            scores[rule] = countdown_score(req.response, req.numbers, req.target or 0)
        elif rule == "format":
            scores[rule] = r1_format(req.response, think_prefilled=req.think_prefilled)
        else:
            scores[rule] = language_consistency(req.response, req.language)
    weights = req.weights or {}
    return RuleScore(reward=sum(weights.get(r, 1.0) * v for r, v in scores.items()), scores=scores)


def score_rule_request(request: dict[str, Any]) -> dict[str, Any]:
    """:func:`score_rules` on a plain dict, for runners that call functions by import path
    (tangram-core's process pool): validates it as a :class:`RuleRequest` (a bad one raises
    ValueError naming the field) and returns the score as a dict, the shape the rule
    deployment answers."""
    try:
        req = RuleRequest.model_validate(request)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"invalid rule request: {field or 'request'}: {err['msg']}") from None
    return score_rules(req).model_dump()
