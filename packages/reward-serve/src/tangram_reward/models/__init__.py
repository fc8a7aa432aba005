"""Model-based rewards. torch and transformers (the ``[models]`` extra) load on first use."""

from tangram_reward.models.scalar_rm import (
    ScalarRewardModel,
    ScalarRewardModelConfig,
    validate_pairs,
)

__all__ = ["ScalarRewardModel", "ScalarRewardModelConfig", "validate_pairs"]
