"""The synchronous GRPO loop: rollout -> rewards -> advantages -> update -> weight sync.

One OpenTelemetry trace per step::

    tangram.train.step
      tangram.rollout
        text_completion {model}            (one per turn, the engine batch)
        execute_tool python -> tangram.action -> tangram.sandbox.run
      tangram.train.rewards
        tangram.train.reward -> tangram.action -> tangram.reward.score (in the replica)
      tangram.train.update
      tangram.train.weight_sync

Groups in which any sample hit an infrastructure error are dropped whole and counted
(``infra_dropped``): GRPO's advantage needs the full group, and scoring the failure 0 would
teach the model something false.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opentelemetry import trace

from r1_train.agent_loop import Trajectory, rollout
from r1_train.checkpoint import latest_checkpoint, next_step, restore_trainer_state, save_checkpoint
from r1_train.config import ModelConfig, TrainConfig
from r1_train.grpo import group_advantages, informative_groups, overlong_penalty
from r1_train.metrics import MetricsWriter
from r1_train.policy import Policy, make_batch
from r1_train.prompts import render_prompt
from r1_train.rewards import score_all
from r1_train.rollout import OpenAIServerEngine, RolloutEngine, VLLMEngine, checkpoint_tensors
from r1_train.services import services
from r1_train.tasks import CODE_PROBLEMS, Task, arithmetic, countdown, load_tasks
from tangram_core import semconv as sc

_tracer = trace.get_tracer("r1_train")
PRIMARY = ("math", "countdown", "code")


def build_tasks(cfg: TrainConfig) -> list[Task]:
    t = cfg.task
    if t.kind == "arithmetic":
        return arithmetic(t.size, seed=t.seed, max_operand=t.max_operand)
    if t.kind == "countdown":
        return countdown(t.size, seed=t.seed, max_operand=t.max_operand)
    if t.kind == "code":
        return list(CODE_PROBLEMS)
    assert t.path is not None  # the config validator guarantees it
    return load_tasks(t.path)


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
    info = {"infra_dropped": len(groups) - len(ok), "flat_dropped": 0}
    if not ok:
        return [], info
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


class Trainer:
    """Owns the policy, the engine and the metrics; the services come in per run."""

    def __init__(self, cfg: TrainConfig, *, engine: RolloutEngine | None = None) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(cfg.run.out_dir)
        self.start_step = 0
        model_cfg = cfg.model
        resume_from = latest_checkpoint(self.run_dir) if cfg.run.resume else None
        if resume_from is not None:
            self.start_step = next_step(resume_from)
            model_cfg = ModelConfig(path=resume_from, dtype=cfg.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
        self.tasks = build_tasks(cfg)
        self.policy = Policy(
            model_cfg,
            cfg.optim,
            cfg.grpo,
            total_steps=cfg.run.steps,
            temperature=cfg.rollout.temperature,
            reference=cfg.model,
        )
        if resume_from is not None:
            restore_trainer_state(resume_from, self.policy)
        if engine is None and cfg.rollout.engine == "openai":
            assert cfg.rollout.server_url is not None  # the config validator guarantees it
            engine = OpenAIServerEngine(cfg.rollout.server_url, cfg.rollout)
            if resume_from is not None:
                engine.sync_weights(checkpoint_tensors(self.policy.model), self.start_step)
        self.engine = engine or VLLMEngine(
            model_cfg.path,
            cfg.rollout,
            seed=cfg.run.seed,
            dtype="bfloat16" if self.policy.dtype == torch.bfloat16 else "float32",
        )
        self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.run.tensorboard)
        self.version = self.start_step
        self.engine_fingerprint: float | None = None  # what the engine reported after a sync

    def prompt_text(self, task: Task) -> str:
        text = render_prompt(task, self.cfg.task.template, self.cfg.agent, self.tokenizer)
        return text + self.cfg.agent.prefill

    async def step(self, orch: Any, step: int) -> StepResult:
        cfg = self.cfg
        clock: dict[str, float] = {}
        t_step = time.perf_counter()
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_STEP, attributes={sc.STEP_ID: step, sc.POLICY_VERSION: self.version}
        ) as step_span:
            tasks = tasks_for_step(self.tasks, cfg, step)
            with _tracer.start_as_current_span(sc.SPAN_ROLLOUT, attributes={sc.STEP_ID: step}):
                trajs = await rollout(
                    self.engine,
                    orch,
                    self.tokenizer,
                    [(t, self.prompt_text(t)) for t in tasks],
                    rollout_cfg=cfg.rollout,
                    agent=cfg.agent,
                    step=step,
                    seed=cfg.run.seed,
                    timings=clock,
                )
            t0 = time.perf_counter()
            with _tracer.start_as_current_span(
                sc.SPAN_TRAIN_REWARDS, attributes={sc.STEP_ID: step}
            ):
                if orch is None:
                    raise RuntimeError("rewards need the orchestrator; no reward is configured")
                await score_all(orch, trajs, cfg.rewards, step)
            clock["rewards"] = time.perf_counter() - t0
            kept, info = select_for_training(trajs, cfg)
            update: dict[str, float] = {}
            if kept:
                update = await self.update_and_publish(kept, step, clock, self._sync_engine)
                self.version += 1
            clock["step"] = time.perf_counter() - t_step
            row = self.metrics_row(trajs, info, update, clock)
            step_span.set_attribute(
                sc.REWARD, row["reward_mean"] if row["reward_mean"] is not None else 0.0
            )
        self.metrics.write(step, row)
        self.log_samples(step, trajs)
        return StepResult(step, row, trajs)

    async def _sync_engine(self, state: dict[str, Any], version: int) -> float:
        return await asyncio.to_thread(self.engine.sync_weights, state, version)

    async def update_and_publish(
        self,
        kept: list[tuple[Trajectory, float]],
        step: int,
        clock: dict[str, float],
        publish: Callable[[dict[str, Any], int], Awaitable[float]],
    ) -> dict[str, float]:
        """One GRPO update on ``kept``, then its weights handed to the engine by ``publish``
        (blocking sync, or the streaming engine's update between decode steps), each in its
        span and timed into ``clock``. The caller bumps ``version`` once the engine has them."""
        t0 = time.perf_counter()
        with _tracer.start_as_current_span(sc.SPAN_TRAIN_UPDATE, attributes={sc.STEP_ID: step}):
            update = await asyncio.to_thread(self.train_on, kept)
        clock["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_WEIGHT_SYNC, attributes={sc.POLICY_VERSION: self.version + 1}
        ):
            state = checkpoint_tensors(self.policy.model)
            self.engine_fingerprint = await publish(state, self.version + 1)
        clock["sync"] = time.perf_counter() - t0
        return update

    def log_samples(self, step: int, trajs: list[Trajectory], per_step: int = 4) -> None:
        """A few whole trajectories per step, to read what the model actually does."""
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for t in trajs[:per_step]:
                record = {
                    "step": step,
                    "trajectory": t.id,
                    "prompt": t.task.prompt,
                    "answer": t.task.answer,
                    "transcript": self.cfg.agent.prefill + t.transcript,
                    "reward": t.reward,
                    "parts": t.reward_parts,
                    "infra_error": t.infra_error,
                }
                f.write(json.dumps(record) + "\n")

    def train_on(self, kept: list[tuple[Trajectory, float]]) -> dict[str, float]:
        masks = []
        for t, _ in kept:
            m = list(t.mask)
            if self.cfg.grpo.mask_truncated and t.truncated:
                m = [0] * len(m)
            masks.append(m)
        pad = self.tokenizer.pad_token_id
        batch = make_batch(
            [t.prompt_ids for t, _ in kept],
            [t.completion_ids for t, _ in kept],
            masks,
            [a for _, a in kept],
            pad if pad is not None else 0,
            sampler_logprobs=[t.sampler_logprobs for t, _ in kept],
        )
        if not float(batch.completion_mask.sum()):
            return {}
        self.policy.fill_old_and_ref(batch)
        return self.policy.update(batch, max_completion_length=self.cfg.rollout.max_total_tokens)

    def metrics_row(
        self,
        trajs: list[Trajectory],
        info: dict[str, int],
        update: dict[str, float],
        clock: dict[str, float],
    ) -> dict[str, Any]:
        scored = [t for t in trajs if t.reward is not None]
        row: dict[str, Any] = {
            "policy_version": self.version,
            "samples": len(trajs),
            "infra_errors": sum(1 for t in trajs if t.infra_error),
            **info,
            "reward_mean": statistics.fmean(t.reward or 0.0 for t in scored) if scored else None,
            "response_tokens_mean": statistics.fmean(sum(t.mask) for t in trajs),
            "turns_mean": statistics.fmean(t.turns for t in trajs),
            "tool_calls": sum(len(t.tool_calls) for t in trajs),
            "truncated": sum(1 for t in trajs if t.truncated),
        }
        for name in self.cfg.rewards.weights:
            vals = [t.reward_parts[name] for t in scored if name in t.reward_parts]
            row[f"reward/{name}"] = statistics.fmean(vals) if vals else None
        primary = next((p for p in PRIMARY if p in self.cfg.rewards.weights), None)
        if primary is not None:
            vals = [t.reward_parts.get(primary, 0.0) for t in scored]
            row["accuracy"] = statistics.fmean(v >= 1.0 for v in vals) if vals else None
        acts = [c.act_s for t in trajs for c in t.tool_calls]
        row["act/sandbox.run"] = statistics.fmean(acts) if acts else None
        waits = [c.queue_wait_s for t in trajs for c in t.tool_calls]
        row["queue_wait/sandbox.run"] = statistics.fmean(waits) if waits else None
        for kind in sorted({k for t in trajs for k in t.action_act_s}):
            vals = [t.action_act_s[kind] for t in trajs if kind in t.action_act_s]
            row[f"act/{kind}"] = statistics.fmean(vals)
        generated = sum(sum(t.mask) for t in trajs)
        row["tokens_per_s"] = generated / clock["generation"] if clock.get("generation") else None
        row.update(update)
        row.update({f"time/{k}": v for k, v in clock.items()})
        return row

    async def train(self) -> list[StepResult]:
        from tqdm import tqdm

        results = []
        async with services(self.cfg) as orch:
            if self.cfg.run.mode == "async":
                from r1_train.async_trainer import AsyncRun

                return await AsyncRun(self, orch).run()
            bar = tqdm(
                range(self.start_step, self.cfg.run.steps),
                desc="GRPO",
                unit="step",
                disable=not self.cfg.run.progress,
                initial=self.start_step,
                total=self.cfg.run.steps,
            )
            for step in bar:
                res = await self.step(orch, step)
                results.append(res)
                m = res.metrics
                bar.set_postfix(
                    reward=f"{m['reward_mean']:.3f}" if m["reward_mean"] is not None else "n/a",
                    loss=f"{m.get('loss', float('nan')):.4f}",
                )
                self.save_if_due(step)
        return results

    def save_if_due(self, step: int) -> None:
        """Checkpoint after ``step`` every ``run.save_every`` steps, and after the last."""
        every = self.cfg.run.save_every
        if (every and (step + 1) % every == 0) or step + 1 == self.cfg.run.steps:
            save_checkpoint(self.run_dir, step + 1, self.policy, self.tokenizer)

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()
