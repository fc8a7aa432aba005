"""Rule-based rewards: pure functions of (response, reference), no model and no I/O.

Each returns a float in [0, 1]; TRL-style batch use is ``[fn(r, ref) for r, ref in ...]``.
"""

from tangram_reward.rules.answers import AnswerSource, ExtractedAnswer, extract_answer
from tangram_reward.rules.format_reward import r1_format
from tangram_reward.rules.language_reward import language_consistency
from tangram_reward.rules.math_reward import answers_equivalent, math_accuracy

__all__ = [
    "AnswerSource",
    "ExtractedAnswer",
    "answers_equivalent",
    "extract_answer",
    "language_consistency",
    "math_accuracy",
    "r1_format",
]
