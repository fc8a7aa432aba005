"""Model-based rewards: a scalar reward model and a generative judge. torch, transformers
(the ``[models]`` extra) and vLLM load on first use."""

from tangram_reward.models.judge import Judge, JudgeConfig, JudgeSpec, JudgeVerdict
from tangram_reward.models.judge_parse import JudgeParseError, JudgeScore, parse_score
from tangram_reward.models.scalar_rm import (
    ScalarRewardModel,
    ScalarRewardModelConfig,
    validate_pairs,
)

__all__ = [
    "Judge",
    "JudgeConfig",
    "JudgeParseError",
    "JudgeScore",
    "JudgeSpec",
    "JudgeVerdict",
    "ScalarRewardModel",
    "ScalarRewardModelConfig",
    "parse_score",
    "validate_pairs",
]
