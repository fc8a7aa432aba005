"""Configuration of the RL-loop model (:mod:`.rl_loop`): engines, trajectories, trainer, mode.

Every modelling assumption is a field here, with its default and why; the model itself has no
hidden constants. Cross-field rules are checked once, at construction, with errors that name the
values and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_core.sim.workloads import CodeAgentWorkload


class DecodeModel(BaseModel):
    """One rollout engine (a vLLM/SGLang instance on one or more GPUs) with continuous batching.

    A decode step emits one token for every active sequence and takes
    ``step_base_s + step_per_seq_s * active``: the fixed part is reading the weights once per
    step (memory-bound), the per-sequence part is attention over that sequence's KV cache and its
    share of the matmuls. So one long sequence alone on an engine runs at the fixed cost per token,
    which is what makes the long tail expensive: the engine is nearly as busy with 1 sequence as
    with 64.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    step_base_s: float = Field(0.006, gt=0, description="Fixed cost of one decode step (a).")
    step_per_seq_s: float = Field(
        8e-5, ge=0, description="Added step cost per active sequence (b)."
    )
    max_batch: int = Field(
        256, ge=1, description="Most sequences decoded together; the rest wait in the engine."
    )


class RolloutWorkload(BaseModel):
    """What one trajectory is: turns of generated tokens, tool calls between them, a reward.

    A trajectory has ``min_turns``..``max_turns`` turns. Each turn generates a lognormal number of
    tokens (``tokens_median``, ``tokens_sigma``); a ``tail_fraction`` of turns instead draw from a
    Pareto tail (``tail_min_tokens``, ``tail_alpha``), and every turn is capped at
    ``max_tokens_per_turn`` (the response-length limit). Between turns the policy calls a tool:
    one sandbox action drawn from ``actions`` (the calibrated code-agent distribution of
    :mod:`.workloads`). After the last turn the trajectory is scored: by a reward model on the
    GPU pool (``reward="model"``, drawn from ``actions``) or by a rule verifier on one CPU core
    that takes ``rule_reward_s`` (``reward="rule"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    groups_per_step: int = Field(32, ge=1, description="Prompts per trainer update.")
    group_size: int = Field(8, ge=1, description="Samples per prompt, scored together (GRPO G).")
    min_turns: int = Field(1, ge=1)
    max_turns: int = Field(1, ge=1)
    tokens_median: float = Field(1000.0, gt=0, description="Median tokens generated per turn.")
    tokens_sigma: float = Field(0.8, ge=0, description="Lognormal sigma of tokens per turn.")
    tail_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of turns drawn from the Pareto tail."
    )
    tail_min_tokens: float = Field(4000.0, gt=0, description="Where the Pareto tail starts.")
    tail_alpha: float = Field(1.2, gt=0, description="Pareto shape (smaller: heavier tail).")
    max_tokens_per_turn: int = Field(16384, ge=1, description="Response-length cap per turn.")
    reward: Literal["model", "rule"] = Field(
        "model", description="Score with a reward model (GPU pool) or a rule verifier (CPU)."
    )
    rule_reward_s: float = Field(0.05, gt=0, description="Duration of a rule-verifier call.")
    actions: CodeAgentWorkload = Field(
        default_factory=CodeAgentWorkload,
        description="Tool-call and reward-model durations (its exec_*, tail_*, tests_*, reward_* "
        "fields); its generation and step fields are not used, as generation is in tokens here.",
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutWorkload:
        if self.min_turns > self.max_turns:
            raise ValueError(
                f"min_turns ({self.min_turns}) must be <= max_turns ({self.max_turns}); "
                f"raise max_turns or lower min_turns"
            )
        return self

    @property
    def batch_size(self) -> int:
        """Trajectories per trainer update."""
        return self.groups_per_step * self.group_size


class TrainerModel(BaseModel):
    """The trainer: ``update_s`` per update (log-probs, loss, optimizer) on one batch, then
    ``sync_s`` to publish the new weights. Engines pause ``sync_s`` to load them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    update_s: float = Field(gt=0, description="Seconds of one update on one batch (U).")
    sync_s: float = Field(0.0, ge=0, description="Seconds to publish and load new weights (S).")


class RLLoopConfig(BaseModel):
    """One simulated training run: ``steps`` updates in ``mode``, on ``engines`` engines.

    ``mode="sync"``: generate a batch, wait for its last trajectory, update, sync, repeat.
    ``mode="async"``: engines keep generating while the trainer updates. Up to
    ``(version + max_staleness + 1) * groups_per_step`` groups are started by the time the
    trainer has published ``version`` updates, and a sample is trained only if the policy
    version of its oldest token is at least ``version - max_staleness``. With
    ``in_flight="continue"`` (partial rollout) a trajectory keeps generating under new weights;
    with ``"drop"`` it is restarted from its prompt at every weight update.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(
        0, ge=0, description="Policy versions a trained token may lag the trainer (async only)."
    )
    in_flight: Literal["continue", "drop"] = Field(
        "continue", description="At a weight update: continue in-flight trajectories or restart."
    )
    engines: int = Field(8, ge=1, description="Rollout engines.")
    engine: DecodeModel = Field(default_factory=DecodeModel)
    workload: RolloutWorkload = Field(default_factory=RolloutWorkload)
    trainer: TrainerModel = Field(default_factory=lambda: TrainerModel(update_s=30.0))
    steps: int = Field(8, ge=1, description="Trainer updates to run.")
    warmup_steps: int = Field(
        0, ge=0, description="Updates left out of the steady-state throughput (pipeline fill)."
    )
    capacity: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 256.0, "gpu": 8.0},
        description="External pools the tangram scheduler shares among all actions.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RLLoopConfig:
        if self.mode == "sync" and self.max_staleness:
            raise ValueError(
                f"max_staleness ({self.max_staleness}) applies only to mode='async'; "
                f"set mode='async' or max_staleness=0"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps}): no update "
                f"would be left to measure; lower warmup_steps or raise steps"
            )
        w = self.workload
        needs = {"cpu": w.max_turns > 1 or w.reward == "rule", "gpu": w.reward == "model"}
        for pool, needed in needs.items():
            if needed and self.capacity.get(pool, 0.0) < 1.0:
                why = "the reward model runs on it" if pool == "gpu" else "tool calls run on it"
                raise ValueError(
                    f"capacity[{pool!r}] ({self.capacity.get(pool, 0.0)}) must be >= 1: {why}; "
                    f"add capacity={{{pool!r}: N}}"
                )
        return self
