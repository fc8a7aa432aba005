"""The names of GRPO's variants, as the config accepts them.

Kept apart from :mod:`r1_train.grpo` (the maths, which needs torch) so that reading and
checking a config, ``r1-train run --print-config`` or a bad override's error, costs no torch
import (seconds) and works where torch is not installed.
"""

from __future__ import annotations

from typing import Literal

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ISCorrection = Literal[
    "none", "tis", "mis", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
]
ImportanceSamplingLevel = Literal["token", "sequence"]
AdvantageScale = Literal["group", "batch", "none"]
