"""The R1 format reward: reasoning in <think>...</think>, then the answer in <answer> tags.

R1-Zero's template asks the assistant to put its reasoning between ``<think>`` and ``</think>``
and then its answer between ``<answer>`` and ``</answer>``, with nothing else around them. The
reward is 1.0 only for exactly that shape:

* one think block and one answer block, in that order, separated only by whitespace;
* both blocks non-empty, no nested or repeated tags, and no text before or after.

Many chat templates already open ``<think>`` in the prompt (``Assistant: <think>``). Then the
response starts inside the block, and ``think_prefilled=True`` grades it as if the tag were
there.
"""

from __future__ import annotations

import re

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_SHAPE = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)


def r1_format(response: str, *, think_prefilled: bool = False) -> float:
    """1.0 if ``response`` follows the R1 template exactly, else 0.0."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    text = "<think>" + response if think_prefilled else response
    match = _SHAPE.match(text)
    if match is None:
        return 0.0
    think, answer = match.group("think"), match.group("answer")
    if not think.strip() or not answer.strip():
        return 0.0
    if any(tag in think or tag in answer for tag in _TAGS):
        return 0.0  # repeated or nested tags: the model is gaming the shape
    return 1.0
