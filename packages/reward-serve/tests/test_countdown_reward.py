"""The Countdown rule: exact arithmetic, each number at most once, no Python evaluation."""

from __future__ import annotations

import pytest

from tangram_reward.rules.countdown_reward import countdown_score
from tangram_reward.rules.request import RuleRequest, score_rules


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>try</think><answer>(3 + 5) * 7</answer>", 1.0),  # 56
        ("<answer>7 * (5 + 3) = 56</answer>", 1.0),  # a '= target' tail is fine
        ("I get it.\n3 * 7 + 5 * 7", 0.0),  # 7 used twice
        ("<answer>3 + 5 + 7</answer>", 0.0),  # 15, not 56
        ("<answer>56</answer>", 0.0),  # 56 is not one of the numbers
        ("<answer>__import__('os')</answer>", 0.0),  # not an equation at all
        ("<answer>(3 + 5) * 7 ** 1</answer>", 0.0),  # '**' is not allowed
        ("no equation here", 0.0),
    ],
)
def test_countdown_scores(response: str, expected: float) -> None:
    assert countdown_score(response, [3, 5, 7], 56) == expected


def test_division_is_exact() -> None:
    # 7 / 2 * 2 is exactly 7 with fractions (floating point would also pass here, 1/3*3 not)
    assert countdown_score("<answer>1 / 3 * 3 + 6</answer>", [1, 3, 3, 6], 7) == 1.0
    assert countdown_score("<answer>6 / (3 - 3)</answer>", [6, 3, 3], 1) == 0.0


def test_the_rule_needs_numbers_and_target() -> None:
    with pytest.raises(ValueError, match="rule 'countdown' needs 'numbers' and 'target'"):
        RuleRequest(response="<answer>1+2</answer>", rules=("countdown",))
    req = RuleRequest(
        response="<answer>1 + 2</answer>", rules=("countdown",), numbers=(1, 2), target=3
    )
    assert score_rules(req).scores == {"countdown": 1.0}
