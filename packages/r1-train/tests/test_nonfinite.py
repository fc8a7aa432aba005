"""NaN and infinite inputs on a real policy (the tiny Llama): counted, named, never trained on.

A non-finite reward gets advantage 0 and is counted in the step's metrics; a non-finite sampler
log-prob gets no correction and is counted; past ``grpo.max_nonfinite_fraction`` the run stops
naming the samples; an optimiser step whose loss or gradient is not finite is skipped with the
weights left exactly as they were.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from r1_train.agent_loop import Trajectory
from r1_train.config import TrainConfig
from r1_train.nonfinite import NonFiniteError
from r1_train.policy import Policy, make_batch
from r1_train.step import select_for_training
from r1_train.tasks import Task
from r1_train.trainer import Trainer

G = 4


def make_cfg(model: Path, **grpo: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"path": str(model), "dtype": "float32"},
            "rollout": {"group_size": G, "max_new_tokens": 8, "max_total_tokens": 64},
            "optim": {"lr": 1e-2, "micro_batch_size": 4},
            "grpo": {"max_nonfinite_fraction": 0.25, **grpo},
        }
    )


def make_trainer(cfg: TrainConfig) -> Trainer:
    """The trainer's selection, update and metrics code on a real policy, with no engine."""
    from transformers import AutoTokenizer

    tr: Any = object.__new__(Trainer)
    tr.cfg, tr.version = cfg, 0
    tr.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    tr.policy = Policy(cfg.model, cfg.optim, cfg.grpo, total_steps=2, temperature=1.0)
    return tr


def make_trajs(rewards: list[float], logprob: float = -1.0) -> list[Trajectory]:
    """Groups of ``G`` one-turn samples with the given rewards (all from the ``math`` reward)."""
    out = []
    for i, r in enumerate(rewards):
        task = Task(id=f"t{i // G}", prompt="1 + 1?", answer="2")
        out.append(
            Trajectory(
                task=task,
                group=i // G,
                member=i % G,
                prompt_ids=[5, 6, 7],
                completion_ids=[8 + i % 3, 9, 10],
                mask=[1, 1, 1],
                sampler_logprobs=[logprob, -1.5, -0.5],
                turns=1,
                reward=r,
                reward_parts={"math": r},
            )
        )
    return out


def weights(policy: Policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.model.parameters()]


def all_finite(policy: Policy) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in policy.model.parameters())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reward_gets_advantage_0_is_counted_and_trains_finite(
    tiny_model_dir: Path, bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_trainer(make_cfg(tiny_model_dir, dynamic_sampling=True))
    trajs = make_trajs([1.0, bad, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    before = weights(tr.policy)
    kept, info = select_for_training(trajs, tr.cfg)
    assert info["nonfinite_rewards"] == 1
    assert info["flat_dropped"] == 0  # group 0 still has signal among its finite rewards
    assert len(kept) == 2 * G
    assert kept[1][1] == 0.0
    assert all(math.isfinite(a) for _, a in kept)
    assert "t0/g0s1" in caplog.text
    assert f"math={bad}" in caplog.text
    update = tr.train_on(kept)
    assert update["update_skipped"] == 0.0
    assert all_finite(tr.policy)
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(tr.policy), strict=True))
    row = tr.metrics_row(trajs, info, update, {})
    assert row["nonfinite_rewards"] == 1
    assert row["update_skipped"] == 0.0
    # The step's means are over the finite rewards: a number, never NaN (null in the log).
    finite = [t.reward for t in trajs if t.reward is not None and math.isfinite(t.reward)]
    assert row["reward_mean"] == pytest.approx(sum(finite) / len(finite))
    assert math.isfinite(row["reward/math"])


def test_too_many_non_finite_rewards_stop_the_run_naming_them(tiny_model_dir: Path) -> None:
    cfg = make_cfg(tiny_model_dir)  # at most a quarter of the rewards
    trajs = make_trajs([1.0, math.nan, 0.0, math.nan, 0.0, 1.0, math.inf, 0.0])
    with pytest.raises(NonFiniteError, match=r"3 of 8 rewards") as err:
        select_for_training(trajs, cfg)
    assert "t0/g0s1 (reward nan; math=nan)" in str(err.value)
    assert "t1/g1s2 (reward inf; math=inf)" in str(err.value)
    assert "grpo.max_nonfinite_fraction (0.25)" in str(err.value)


def test_a_nan_sampler_logprob_is_counted_and_trains_finite(tiny_model_dir: Path) -> None:
    tr = make_trainer(make_cfg(tiny_model_dir, is_correction="sequence_mask", is_cap=3.0))
    trajs = make_trajs([1.0, 0.0, 0.0, 1.0])
    trajs[2].sampler_logprobs[1] = math.nan
    kept, _ = select_for_training(trajs, tr.cfg)
    update = tr.train_on(kept)
    assert update["nonfinite_logprobs"] == 1.0
    assert update["update_skipped"] == 0.0
    assert math.isfinite(update["loss"])
    assert math.isfinite(update["mismatch/kl"])
    assert all_finite(tr.policy)
    trajs = make_trajs([1.0, 0.0, 0.0, 1.0], logprob=math.nan)  # 4 of 12 tokens, over 0.25
    kept, _ = select_for_training(trajs, tr.cfg)
    with pytest.raises(NonFiniteError, match="4 of 12 trained tokens have a NaN"):
        tr.train_on(kept)


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights(tiny_model_dir: Path) -> None:
    cfg = make_cfg(tiny_model_dir)
    policy = make_trainer(cfg).policy
    before = weights(policy)
    prompts, completions = [[5, 6, 7]] * 2, [[8, 9], [10, 11]]
    broken = make_batch(prompts, completions, [[1, 1]] * 2, [math.nan, 1.0], pad_id=0)
    update = policy.update(broken, max_completion_length=8)
    assert update["update_skipped"] == 1.0
    assert update["grad_finite"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(policy), strict=True))
    assert not policy.optimizer.state  # AdamW's moments were not touched either
    fine = make_batch(prompts, completions, [[1, 1]] * 2, [-1.0, 1.0], pad_id=0)
    assert policy.update(fine, max_completion_length=8)["update_skipped"] == 0.0
    assert all_finite(policy)


def test_the_trainer_passes_the_completion_budget_to_dr_grpo(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dr. GRPO's constant is max_new_tokens x max_turns (TRL's max_completion_length), not
    rollout.max_total_tokens, which also holds the prompt."""
    import r1_train.policy as policy_module

    seen: list[int | None] = []
    real = policy_module.policy_loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("max_completion_length"))
        return real(*args, **kwargs)

    monkeypatch.setattr(policy_module, "policy_loss", spy)
    tr = make_trainer(make_cfg(tiny_model_dir, loss_type="dr_grpo", scale="none"))
    kept, _ = select_for_training(make_trajs([1.0, 0.0, 0.0, 1.0]), tr.cfg)
    tr.train_on(kept)
    assert seen == [8]
