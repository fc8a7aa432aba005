"""Rule-based rewards: pure functions of (response, reference), no model and no I/O, and the
code reward, which runs the response's tests as a tangram-core sandbox action.

Each returns a float in [0, 1]; TRL-style batch use is ``[fn(r, ref) for r, ref in ...]``.
"""

from tangram_reward.rules.answers import AnswerSource, ExtractedAnswer, extract_answer
from tangram_reward.rules.code_reward import (
    CodeRewardRequest,
    CodeRewardUnavailable,
    CodeScore,
    code_reward,
    extract_code,
)
from tangram_reward.rules.format_reward import r1_format
from tangram_reward.rules.language_reward import language_consistency
from tangram_reward.rules.math_reward import answers_equivalent, math_accuracy

__all__ = [
    "AnswerSource",
    "CodeRewardRequest",
    "CodeRewardUnavailable",
    "CodeScore",
    "ExtractedAnswer",
    "answers_equivalent",
    "code_reward",
    "extract_answer",
    "extract_code",
    "language_consistency",
    "math_accuracy",
    "r1_format",
]
