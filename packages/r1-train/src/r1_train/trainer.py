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
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from opentelemetry import trace

from r1_train.agent_loop import Trajectory, rollout
from r1_train.checkpoint import latest_checkpoint, next_step, restore_trainer_state, save_checkpoint
from r1_train.config import ModelConfig, TrainConfig
from r1_train.eval_section import eval_due
from r1_train.evaluate import EvalConfig
from r1_train.metrics import SAMPLES_FILE, MetricsWriter, trim_step_logs
from r1_train.policy import Policy, make_batch
from r1_train.prompts import render_prompt
from r1_train.rewards import score_all
from r1_train.rollout import OpenAIServerEngine, RolloutEngine, VLLMEngine
from r1_train.services import services
from r1_train.step import StepResult, select_for_training, tasks_for_step
from r1_train.tasks import Task, check_prompt_lengths, tasks_of
from tangram_core import semconv as sc

_tracer = trace.get_tracer("r1_train")
PRIMARY = ("math", "countdown", "code")


class StepLost(RuntimeError):
    """A step's rollout or weight sync failed (the engine died, say): its groups are lost.

    Why: vLLM's own ``EngineDeadError`` says only "See stack trace (above)". This names the
    step, the groups not trained on, how the engine's processes ended, and the checkpoint a
    resumed run (``run.resume=true``) starts from."""

    def __init__(
        self,
        step: int,
        task_ids: list[str],
        phase: str,
        cause: Exception,
        root: str | None,
        run_dir: Path,
    ) -> None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            resume = "no checkpoint was written yet: a resumed run starts again from step 0"
        else:
            nxt = next_step(ckpt)
            redo = f", redoing steps {nxt}-{step}" if nxt < step else ""
            resume = f"resume with run.resume=true from {ckpt} (next step {nxt}{redo})"
        lost = ", ".join(f"prompt {i} ({tid})" for i, tid in enumerate(task_ids)) or "none"
        super().__init__(
            f"step {step}: {phase} failed: {cause!r}"
            + (f"; {root}" if root else "")
            + f". Not trained on: the {len(task_ids)} group(s) of step {step}: {lost}. "
            f"Steps before {step} are trained and logged; {resume}"
        )
        self.step, self.task_ids, self.phase, self.cause, self.root = (
            step,
            task_ids,
            phase,
            cause,
            root,
        )
        self.checkpoint = ckpt


class NothingTrained(RuntimeError):
    """A run whose steps all ended without an update: it must fail, not finish with exit 0."""


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
        self.tasks = tasks_of(cfg.task)
        # before the policy and the engine start: a prompt too long for the context must fail
        # here, naming its file and row, not when a step first samples it
        check_prompt_lengths(
            self.tasks,
            self.prompt_text,
            self.tokenizer,
            max_total_tokens=cfg.rollout.max_total_tokens,
            source=cfg.task.path if cfg.task.kind in ("jsonl", "parquet") else None,
        )
        # steps at or after the start step are (re)done by this run: their old rows go
        self.trimmed_rows = trim_step_logs(self.run_dir, self.start_step)
        self.policy = self._make_policy(model_cfg, resume_from)
        if engine is not None and resume_from is not None:
            # an engine from outside holds weights we do not know: bring it to the checkpoint's
            engine.sync_weights(self.policy.engine_state(), self.start_step)
        self.engine = engine or self._make_engine(model_cfg, resume_from)
        self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.run.tensorboard)
        self.version = self.start_step
        self.engine_fingerprint: float | None = None  # what the engine reported after a sync
        self.groups_trained = 0  # over this process's steps; a run that trains none fails
        self.eval_cfg = self._eval_config()
        self._current: tuple[int, list[Task]] = (self.start_step, [])  # the step under way

    def _eval_config(self) -> EvalConfig | None:
        """``run.eval_every``'s evaluation, as ``r1-train eval`` would run it on this engine;
        its prompts are checked against the context now, not after N steps."""
        cfg = self.cfg
        if not cfg.run.eval_every or cfg.eval is None:
            return None
        from r1_train.evaluate import check_prompts_fit

        eval_cfg = EvalConfig(
            model=cfg.model,
            rollout=cfg.rollout,
            task=cfg.held_out_task,
            eval=cfg.eval,
            seed=cfg.run.seed,
        )
        check_prompts_fit(eval_cfg, self.tokenizer)
        return eval_cfg

    async def evaluate(self, orch: Any, step: int) -> dict[str, float]:
        """The engine's weights after ``step`` (the update was published to it) scored by
        ``r1-train eval``'s :func:`~r1_train.evaluate.evaluate`, sandbox programs through the
        run's own orchestrator. The report goes to ``run.out_dir/eval/step-NNNNNN``."""
        from r1_train.evaluate import evaluate, write_report

        assert self.eval_cfg is not None  # eval_due is false without it
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_EVAL,
            attributes={sc.STEP_ID: step, "tangram.eval.benchmark": self.eval_cfg.eval.benchmark},
        ) as span:
            report, scored = await evaluate(
                self.eval_cfg, engine=self.engine, tokenizer=self.tokenizer, orch=orch
            )
            for name, value in report.scores.items():
                span.set_attribute(f"tangram.eval.{name}", value)
        write_report(self.run_dir / "eval" / f"step-{step + 1:06d}", report, scored)
        return {f"eval/{name}": value for name, value in report.scores.items()}

    def _make_policy(self, model_cfg: ModelConfig, resume_from: Path | None) -> Any:
        """The trainable side: a :class:`Policy` in this process (the cluster run overrides
        this with trainer ranks on Ray, which answer the same calls)."""
        policy = Policy(
            model_cfg,
            self.cfg.optim,
            self.cfg.grpo,
            total_steps=self.cfg.run.steps,
            temperature=self.cfg.rollout.temperature,
            reference=self.cfg.model,
        )
        if resume_from is not None:
            restore_trainer_state(resume_from, policy)
        return policy

    def _make_engine(self, model_cfg: ModelConfig, resume_from: Path | None) -> RolloutEngine:
        """The rollout engine, starting from ``model_cfg``'s weights (the checkpoint's when
        resuming): in-process vLLM, or a server that is brought to those weights."""
        cfg = self.cfg
        if cfg.rollout.engine == "openai":
            assert cfg.rollout.server_url is not None  # the config validator guarantees it
            server = OpenAIServerEngine(cfg.rollout.server_url, cfg.rollout)
            if resume_from is not None:
                server.sync_weights(self.policy.engine_state(), self.start_step)
            return server
        return VLLMEngine(
            model_cfg.path,
            cfg.rollout,
            seed=cfg.run.seed,
            dtype="bfloat16" if self.policy.dtype == torch.bfloat16 else "float32",
        )

    def streaming_engine(self) -> Any:
        """The engine of ``run.mode async``: the in-process vLLM engine, driven so that new
        weights land between two decode steps (:class:`~r1_train.streaming.StreamingEngine`)."""
        from r1_train.streaming import StreamingEngine

        if not isinstance(self.engine, VLLMEngine):
            raise TypeError(
                "run.mode 'async' needs the in-process vLLM engine (rollout.engine 'vllm'), "
                f"got {type(self.engine).__name__}"
            )
        return StreamingEngine(
            self.engine,
            version=self.version,
            on_update=self.cfg.asynchronous.on_update,
            recompute_kv=self.cfg.asynchronous.recompute_kv,
        )

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
            self._current = (step, tasks)
            with _tracer.start_as_current_span(sc.SPAN_ROLLOUT, attributes={sc.STEP_ID: step}):
                try:
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
                except Exception as exc:
                    raise self._lost(step, tasks, "the rollout", exc) from exc
            t0 = time.perf_counter()
            with _tracer.start_as_current_span(
                sc.SPAN_TRAIN_REWARDS, attributes={sc.STEP_ID: step}
            ):
                await score_all(orch, trajs, cfg.rewards, step)
            clock["rewards"] = time.perf_counter() - t0
            kept, info = select_for_training(trajs, cfg)
            update: dict[str, float] = {}
            if kept:
                update = await self.update_and_publish(kept, step, clock, self._sync_engine)
                self.version += 1
            scores: dict[str, float] = {}
            if eval_due(step, cfg.run.eval_every, cfg.run.steps):
                t0 = time.perf_counter()
                scores = await self.evaluate(orch, step)
                clock["eval"] = time.perf_counter() - t0
            clock["step"] = time.perf_counter() - t_step
            row = {**self.metrics_row(trajs, info, update, clock), **scores}
            step_span.set_attribute(
                sc.REWARD, row["reward_mean"] if row["reward_mean"] is not None else 0.0
            )
        self.metrics.write(step, row)
        self.log_samples(step, trajs)
        return StepResult(step, row, trajs)

    async def _sync_engine(self, state: dict[str, Any], version: int) -> float:
        try:
            return await asyncio.to_thread(self.engine.sync_weights, state, version)
        except Exception as exc:
            step, tasks = self._current
            raise self._lost(step, tasks, "the weight sync to the engine", exc) from exc

    def _lost(self, step: int, tasks: list[Task], phase: str, cause: Exception) -> StepLost:
        """The error that ends the run when the engine fails under ``step``: what was lost and
        where to resume from (as the asynchronous trainer's ``RolloutsLost`` does)."""
        diagnose = getattr(self.engine, "diagnose", None)
        root = diagnose() if callable(diagnose) else None
        return StepLost(step, [t.id for t in tasks], phase, cause, root, self.run_dir)

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
        self.groups_trained += len(kept) // self.cfg.rollout.group_size
        clock["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_WEIGHT_SYNC, attributes={sc.POLICY_VERSION: self.version + 1}
        ):
            state = await asyncio.to_thread(self.policy.engine_state)
            self.engine_fingerprint = await publish(state, self.version + 1)
            sent = getattr(self.policy, "last_fingerprint", None)  # the cluster's ranks say
            if sent is not None and not math.isclose(
                self.engine_fingerprint, sent, rel_tol=1e-9, abs_tol=1e-6
            ):
                raise RuntimeError(
                    f"the engines loaded weights with fingerprint {self.engine_fingerprint!r}, "
                    f"not the trainer's {sent!r}: the weight sync corrupted or lost an update"
                )
        clock["sync"] = time.perf_counter() - t0
        return update

    def log_samples(self, step: int, trajs: list[Trajectory], per_step: int = 4) -> None:
        """A few whole trajectories per step, to read what the model actually does."""
        with (self.run_dir / SAMPLES_FILE).open("a") as f:
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
        return self.policy.update(batch, max_completion_length=self.cfg.max_completion_length)

    def metrics_row(
        self,
        trajs: list[Trajectory],
        info: dict[str, int],
        update: dict[str, float],
        clock: dict[str, float],
    ) -> dict[str, Any]:
        scored = [t for t in trajs if t.reward is not None]
        # Means over finite values only: a non-finite reward is counted (nonfinite_rewards)
        # and logged by name, not allowed to turn the step's means into NaN (null in JSON).
        finite = [t for t in scored if math.isfinite(t.reward or 0.0)]
        row: dict[str, Any] = {
            "policy_version": self.version,
            "samples": len(trajs),
            "infra_errors": sum(1 for t in trajs if t.infra_error),
            **info,
            "reward_mean": statistics.fmean(t.reward or 0.0 for t in finite) if finite else None,
            "response_tokens_mean": statistics.fmean(sum(t.mask) for t in trajs),
            "turns_mean": statistics.fmean(t.turns for t in trajs),
            "tool_calls": sum(len(t.tool_calls) for t in trajs),
            "truncated": sum(1 for t in trajs if t.truncated),
        }
        for name in self.cfg.rewards.weights:
            vals = [t.reward_parts[name] for t in scored if name in t.reward_parts]
            vals = [v for v in vals if math.isfinite(v)]
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

        from r1_train.console import progress_stream

        results = []
        async with self._services() as orch:
            if self.cfg.run.mode == "async":
                from r1_train.async_trainer import AsyncRun

                results = await AsyncRun(self, orch).run()
                self._check_trained(results)
                return results
            bar = tqdm(
                range(self.start_step, self.cfg.run.steps),
                desc="GRPO",
                unit="step",
                disable=not self.cfg.run.progress,
                file=progress_stream(),
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
        self._check_trained(results)
        return results

    def _services(self) -> Any:
        """The run's services (see :func:`~r1_train.services.services`)."""
        return services(self.cfg)

    def _check_trained(self, results: list[StepResult]) -> None:
        """A run that stepped but trained on no group has failed, whatever dropped the groups:
        its checkpoints equal the initial model, and it must not end with status 0."""
        if not results or self.groups_trained:
            return
        infra = sum(r.metrics.get("infra_dropped", 0) for r in results)
        flat = sum(r.metrics.get("flat_dropped", 0) for r in results)
        errors = [t.infra_error for r in results for t in r.trajectories if t.infra_error]
        first = f"; the first error: {errors[0]}" if errors else ""
        raise NothingTrained(
            f"steps {results[0].step}-{results[-1].step} trained on no group: {infra} group(s) "
            f"dropped for infrastructure errors, {flat} for equal rewards "
            f"(grpo.dynamic_sampling){first}. The checkpoints hold the initial model"
        )

    def save_if_due(self, step: int) -> None:
        """Checkpoint after ``step`` every ``run.save_every`` steps, and after the last."""
        every = self.cfg.run.save_every
        if (every and (step + 1) % every == 0) or step + 1 == self.cfg.run.steps:
            save_checkpoint(self.run_dir, step + 1, self.policy, self.tokenizer)

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()
