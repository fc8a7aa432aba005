"""Read a score out of a generative judge's text. Pure functions; no model, no I/O.

Why strict: a judge that answers off-script ("I think it's pretty good!") must not become a
reward of 0, which would train the policy on a made-up signal. Text with no score, an
ambiguous score or a score outside the rubric's range raises :class:`JudgeParseError`
(carrying the raw text), which reward-serve reports as a failed reward action, never as 0.

What parses, first match wins (within a form, the *last* occurrence: judges reason first and
give their verdict at the end):

1. a tag: ``<score>7</score>``;
2. a label: ``Score: 7``, ``score = 7/10``, ``Rating: 4.5``, ``Final score is 8``;
3. the whole reply is a number: ``7``, ``7/10``, ``7.``, ``**7**``.

A fraction must be over the rubric's maximum (``7/10`` on a 1-10 rubric); another
denominator (``4/5`` on a 1-10 rubric) is an error rather than a guess at a rescale.
Out-of-range scores are errors, not clamped: a judge that says 11 on a 1-10 rubric did not
follow it, and clamping would turn that into a confident 1.0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["JudgeParseError", "JudgeScore", "parse_score"]

_NUM = r"[-+]?\d+(?:\.\d+)?"
_TAG = re.compile(rf"<score>\s*({_NUM})\s*(?:/\s*({_NUM})\s*)?</score>", re.IGNORECASE)
_LABEL = re.compile(
    rf"\b(?:final\s+)?(?:score|rating|grade)\b[\s*]*(?:is|of)?[\s*]*[:=]?[\s*]*({_NUM})"
    rf"(?:\s*(?:/|out\s+of)\s*({_NUM}))?",
    re.IGNORECASE,
)
_BARE = re.compile(rf"^\W*?({_NUM})(?:\s*/\s*({_NUM}))?[\s.*!]*$")
_SHOWN = 300  # characters of the raw text kept in an error message


class JudgeParseError(ValueError):
    """The judge's text holds no usable score; ``text`` is what it said.

    The message is one line (the raw text is quoted with ``repr``, shortened), because
    callers across Ray report the last line of an error."""

    def __init__(self, reason: str, text: str) -> None:
        shown = text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
        super().__init__(f"{reason}; judge said {shown!r}")
        self.reason = reason
        self.text = text

    def __reduce__(self) -> tuple[type[JudgeParseError], tuple[str, str]]:
        return (JudgeParseError, (self.reason, self.text))


@dataclass(frozen=True)
class JudgeScore:
    """A parsed score: ``raw`` on the rubric's scale, ``reward`` normalised to [0, 1]."""

    raw: float
    reward: float


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007  # keep the last match
        pass
    return found


def parse_score(text: str, lo: float, hi: float) -> JudgeScore:
    """The score in ``text`` on the rubric's scale ``[lo, hi]``, and normalised to [0, 1].

    Raises :class:`JudgeParseError` when there is none, when a fraction is over another
    scale, or when the score is outside ``[lo, hi]``."""
    if not hi > lo:
        raise ValueError(f"score range is empty: max ({hi}) must be > min ({lo})")
    match = _last(_TAG, text) or _last(_LABEL, text) or _BARE.match(text.strip())
    if match is None:
        raise JudgeParseError(
            "no score found (expected e.g. '<score>N</score>' or 'Score: N')", text
        )
    value = float(match.group(1))
    denominator = match.group(2)
    if denominator is not None and float(denominator) != hi:
        raise JudgeParseError(
            f"score {match.group(0).strip()!r} is over {denominator}, but the rubric's scale "
            f"is {lo:g}-{hi:g}",
            text,
        )
    if not math.isfinite(value) or not lo <= value <= hi:
        raise JudgeParseError(f"score {value:g} is outside the rubric's range {lo:g}-{hi:g}", text)
    return JudgeScore(raw=value, reward=(value - lo) / (hi - lo))
