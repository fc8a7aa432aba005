"""Find the final answer in a model's response.

Why our own extractor in front of math-verify: R1-style responses hold many candidate answers
(intermediate results inside ``<think>``, a boxed value, an ``<answer>`` block). The reward must
grade the one the model committed to, and the order of preference is a policy decision that
users need to see:

1. the last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` works);
2. else the content of the last ``<answer>...</answer>`` block;
3. else the last number in the text (outside ``<think>`` when the response has a closed one).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_END = "</think>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


class AnswerSource(enum.StrEnum):
    BOXED = "boxed"
    ANSWER_TAG = "answer_tag"
    LAST_NUMBER = "last_number"


@dataclass(frozen=True, slots=True)
class ExtractedAnswer:
    text: str
    source: AnswerSource


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces balanced; None if unclosed."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end() : i - 1].strip()
    return None


def extract_answer(text: str) -> ExtractedAnswer | None:
    """The answer the response commits to, and where it was found (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"response must be a str, got {type(text).__name__}")
    boxed = last_boxed(text)
    if boxed:
        return ExtractedAnswer(boxed, AnswerSource.BOXED)
    tagged = _ANSWER.findall(text)
    if tagged and tagged[-1].strip():
        inner = tagged[-1].strip()
        return ExtractedAnswer(last_boxed(inner) or inner, AnswerSource.ANSWER_TAG)
    tail = text.rsplit(_THINK_END, 1)[-1] if _THINK_END in text else text
    numbers = _NUMBER.findall(tail)
    if numbers:
        return ExtractedAnswer(numbers[-1].replace(",", ""), AnswerSource.LAST_NUMBER)
    return None
