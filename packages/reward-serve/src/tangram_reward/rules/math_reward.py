"""Math accuracy: is the response's final answer equivalent to the reference?

We extract the committed answer ourselves (:mod:`.answers`), then let ``math-verify`` parse both
sides and compare them symbolically. It handles LaTeX (``\\frac{1}{2}``), plain expressions
(``0.5``), sets, intervals and equations (``x = 2`` against ``2``), which a string or float
comparison gets wrong.

Two details that matter in a reward server:

* math-verify bounds its parsing and comparison with ``signal.alarm``, which works only in the
  main thread of the main interpreter. Ray Serve replicas and thread pools call us from other
  threads, so off the main thread we turn its timeouts off. Our caller (the deployment) bounds
  the wall time instead.
* An answer without math delimiters is parsed inside ``$...$`` first: bare, ``\\frac{\\sqrt{2}}{2}``
  parses to nothing and ``[1, 3]`` to the number 3 instead of an interval.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from math_verify import parse, verify

from tangram_reward.rules.answers import extract_answer

_TIMEOUT_S = 5


def _timeouts() -> dict[str, Any]:
    on_main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": _TIMEOUT_S if on_main else None}


@functools.lru_cache(maxsize=65_536)
def _parse(expr: str) -> tuple[Any, ...]:
    """Parse once per distinct string: a GRPO group's samples share one reference answer and
    often repeat each other, so the cache removes most of the (milliseconds-long) parsing."""
    # Inside math delimiters first: plain-text parsing reads "[1, 3]" as the number 3.
    parsed = parse(expr if "$" in expr else f"${expr}$", **_timeouts())
    if not parsed:
        parsed = parse(expr, **_timeouts())
    return tuple(parsed)


def answers_equivalent(predicted: str, reference: str) -> bool:
    """Symbolic equivalence of two answer strings (LaTeX or plain)."""
    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred:
        return predicted.strip() == reference.strip() and bool(reference.strip())
    on_main = threading.current_thread() is threading.main_thread()
    return bool(verify(list(gold), list(pred), timeout_seconds=_TIMEOUT_S if on_main else None))


def math_accuracy(response: str, reference: str) -> float:
    """1.0 if the response's committed final answer equals ``reference``, else 0.0."""
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"reference answer must be a non-empty str, got {reference!r}")
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if answers_equivalent(answer.text, reference) else 0.0
