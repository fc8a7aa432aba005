"""What one GRPO step is made of, shared by the synchronous and the asynchronous loops: the
step's prompts, the choice of trajectories to train on with their advantages, and the result.

Pure functions of the config and the data (no engine, no services), so that both loops and
their tests use the same rules, and :mod:`r1_train.async_trainer` needs nothing from
:mod:`r1_train.trainer`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from r1_train.agent_loop import Trajectory
from r1_train.config import TrainConfig
from r1_train.grpo import group_advantages, informative_groups, overlong_penalty
from r1_train.nonfinite import check_rewards
from r1_train.tasks import Task


def tasks_for_step(tasks: list[Task], cfg: TrainConfig, step: int) -> list[Task]:
    """The step's prompts: a function of (seed, step) only, so a resumed run sees the same."""
    rng = random.Random(cfg.run.seed * 1_000_003 + step)
    k = cfg.run.prompts_per_step
    return rng.sample(tasks, k) if k <= len(tasks) else [rng.choice(tasks) for _ in range(k)]


def select_for_training(
    trajs: list[Trajectory], cfg: TrainConfig
) -> tuple[list[tuple[Trajectory, float]], dict[str, int]]:
    """Trajectories to train on, with advantages; drops failed and (optionally) flat groups."""
    g = cfg.rollout.group_size
    groups = [trajs[i : i + g] for i in range(0, len(trajs), g)]
    ok = [grp for grp in groups if all(t.reward is not None and not t.infra_error for t in grp)]
    info = {"infra_dropped": len(groups) - len(ok), "flat_dropped": 0, "nonfinite_rewards": 0}
    if not ok:
        return [], info
    # NaN/inf rewards: counted and named here (or the run stops), advantage 0 in group_advantages
    info["nonfinite_rewards"] = check_rewards(
        [t for grp in ok for t in grp], cfg.grpo.max_nonfinite_fraction
    )
    rewards = torch.tensor([t.reward for grp in ok for t in grp], dtype=torch.float64)
    if cfg.grpo.overlong_buffer:
        lengths = torch.tensor([sum(t.mask) for grp in ok for t in grp])
        rewards = (
            rewards
            + overlong_penalty(
                lengths,
                max_length=cfg.rollout.max_new_tokens * cfg.agent.max_turns,
                buffer=cfg.grpo.overlong_buffer,
                penalty=cfg.grpo.overlong_penalty,
            ).double()
        )
    if cfg.grpo.dynamic_sampling:
        keep = informative_groups(rewards, g).tolist()
        info["flat_dropped"] = keep.count(False)
        ok = [grp for grp, k in zip(ok, keep, strict=True) if k]
        rewards = rewards.view(-1, g)[torch.tensor(keep, dtype=torch.bool)].reshape(-1)
        if not ok:
            return [], info
    adv = group_advantages(rewards, g, scale=cfg.grpo.scale).tolist()
    flat = [t for grp in ok for t in grp]
    return list(zip(flat, adv, strict=True)), info


@dataclass
class StepResult:
    step: int
    metrics: dict[str, Any]
    trajectories: list[Trajectory]
