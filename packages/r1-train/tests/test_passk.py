"""pass@k's unbiased estimator against hand-computed values and the exact binomial formula."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from r1_train.passk import mean_accuracy, pass_at_k, pass_at_k_one, pass_at_ks


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_hand_computed_values() -> None:
    assert pass_at_k_one(5, 2, 1) == pytest.approx(0.4)  # c / n at k = 1
    assert pass_at_k_one(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k_one(4, 0, 2) == 0.0
    assert pass_at_k_one(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert pass_at_k_one(1, 1, 1) == 1.0


def test_equals_the_binomial_formula() -> None:
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k_one(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12)


def test_benchmark_score_is_the_mean_over_problems() -> None:
    n, c = [10, 10, 10], [0, 5, 10]
    expected = (0 + float(_exact(10, 5, 3)) + 1) / 3
    assert pass_at_k(n, c, 3) == pytest.approx(expected, abs=1e-15)
    assert pass_at_ks(n, c, [1, 3, 20]) == {
        "pass@1": pytest.approx(0.5),
        "pass@3": pass_at_k(n, c, 3),
    }
    # accuracy weighs samples, pass@1 weighs problems: they differ when n differs
    assert mean_accuracy([2, 4], [2, 0]) == pytest.approx(1 / 3)
    assert pass_at_k([2, 4], [2, 0], 1) == pytest.approx(0.5)


def test_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="correct <= samples"):
        pass_at_k_one(3, 4, 1)
    with pytest.raises(ValueError, match=r"pass@5 needs 1 <= k <= samples \(3\)"):
        pass_at_k_one(3, 1, 5)
    with pytest.raises(ValueError, match="fewest is 2"):
        pass_at_k([5, 2], [1, 1], 3)
    with pytest.raises(ValueError, match="no problems"):
        pass_at_k([], [], 1)
