"""R1's language-consistency reward: the share of the chain of thought in the target language.

R1 added it because RL made chains of thought drift between languages. We measure the share of
letters (not bytes or tokens) in the target script, inside ``<think>`` when the response has a
think block. Scripts are the common ones; digits, punctuation and maths are ignored, so an
English proof full of equations still scores 1.0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
# target -> predicate on a letter
_SCRIPTS: dict[str, Callable[[str], bool]] = {
    "en": lambda ch: "LATIN" in unicodedata.name(ch, ""),
    "zh": lambda ch: "CJK" in unicodedata.name(ch, ""),
    "ru": lambda ch: "CYRILLIC" in unicodedata.name(ch, ""),
}


def language_consistency(response: str, target: str = "en") -> float:
    """Share (0..1) of the reasoning's letters in ``target``'s script; 1.0 if it has none."""
    if target not in _SCRIPTS:
        raise ValueError(f"unknown target language {target!r}; supported: {sorted(_SCRIPTS)}")
    match = _THINK.search(response)
    text = match.group(1) if match else response
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    in_target = _SCRIPTS[target]
    return sum(1 for ch in letters if in_target(ch)) / len(letters)
