"""``r1-train sample``: rejection sampling, the step of DeepSeek-R1's recipe that turns a
teacher's verified answers into an SFT set.

    r1-train sample --config FILE.yaml model.path=runs/r1/checkpoint-000020 sample.n=8 \
        sample.out=data/accepted.jsonl
    r1-train sample --config FILE.yaml --resume          # skip the prompts already done

The teacher (in-process vLLM) samples ``sample.n`` answers to each prompt of the ``task.*``
tasks, prompted as training prompts them. Each answer is scored by the reward path of
``r1-train run`` (:func:`r1_train.rewards.score_one`): math and Countdown by reward-serve's rule
verifier on Ray Serve, code by its tests in the sandbox, each a tangram-core action. An answer
is accepted when its task's own check scores 1 (``math``, ``countdown`` or ``code``: all tests
pass), or, with ``sample.min_reward``, when its weighted reward reaches it. An answer whose
reward action failed for infrastructure reasons is counted ``infra_failed``, not rejected.

Accepted answers go to ``sample.out`` as ``r1-train sft`` rows; per-prompt counts go beside it
(:mod:`r1_train.sample_io`, which also explains how a killed run is resumed). With the ``chat``
template a row holds the system and user messages the teacher saw and its answer, so the
student is trained on the prompt it is evaluated on; with ``plain`` and ``r1_zero`` the whole
prompt text is the user message (``r1-train sft`` renders every row with the chat template).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1_train.config import (
    ConfigError,
    GRPOConfig,
    ModelConfig,
    RewardsConfig,
    RolloutConfig,
    RunConfig,
    SandboxConfig,
    TaskConfig,
    TrainConfig,
)
from r1_train.eval_section import EvalSection
from r1_train.evaluate import EvalConfig
from r1_train.sample_io import (
    PromptCounts,
    Writer,
    check_resumable,
    counts_path,
    prepare,
    summarise,
    summary_path,
)
from r1_train.subconfig import load_subconfig
from r1_train.tasks import Task

_tracer = trace.get_tracer("r1_train")
SPAN_SAMPLE_BATCH = "tangram.sample.batch"  # one engine call: generation and scoring
SPAN_SAMPLE_PROMPT = "tangram.sample.prompt"  # one prompt's verdicts and write
Verdict = Literal["accepted", "rejected", "infra_failed"]
#: The task type of each built-in task kind, which is also the name of the reward that checks it.
KIND_TYPE = {"arithmetic": "math", "countdown": "countdown", "code": "code"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleSection(_Strict):
    out: Path = Field(
        description="The SFT set written: JSONL, one {'messages': [...]} per accepted answer. "
        "Counts go to <stem>.counts.jsonl and <stem>.summary.json beside it."
    )
    n: int | None = Field(
        None,
        ge=1,
        description="Answers sampled per prompt (TRL's num_generations, verl's rollout.n); "
        "None: rollout.group_size, so a training config samples its GRPO group size.",
    )
    max_per_prompt: int | None = Field(
        None, ge=1, description="Write at most this many accepted answers per prompt."
    )
    dedup: bool = Field(True, description="Write an accepted answer text only once per prompt.")
    drop_truncated: bool = Field(
        True,
        description="Reject answers cut at rollout.max_new_tokens even when their check passes "
        "(SFT would teach the student to stop mid-sentence).",
    )
    min_reward: float | None = Field(
        None,
        description="Accept answers whose weighted reward (rewards.weights) reaches this; "
        "None: accept when the task's own check (math, countdown or code) scores 1.",
    )
    limit: int | None = Field(None, ge=1, description="Only the first N prompts.")
    batch_prompts: int = Field(
        16, ge=1, description="Prompts per engine call; a killed run loses at most these."
    )
    progress: bool = True


class SampleConfig(_Strict):
    """``r1-train sample``'s tree: ``model`` (the teacher), ``rollout``, ``task``, ``rewards``
    and ``sandbox`` as ``r1-train run`` has them, plus ``sample``."""

    model: ModelConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rewards: RewardsConfig | None = Field(
        None, description="None: each task scored by its own check (math, countdown or code)."
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    sample: SampleSection
    seed: int = Field(0, description="Sampling seeds are functions of it and the prompt index.")

    @property
    def n(self) -> int:
        return self.sample.n or self.rollout.group_size

    @model_validator(mode="after")
    def _scorable(self) -> SampleConfig:
        kind_type = KIND_TYPE.get(self.task.kind)
        if kind_type is not None:  # a file's task types are known once it is read
            check_rewards(self, {kind_type})
            services_config(self, {kind_type})
        return self

    def eval_config(self) -> EvalConfig:
        """The prompts, requests and engine as ``r1-train eval`` builds them."""
        section = EvalSection(
            benchmark="tasks", samples=self.n, limit=self.sample.limit, progress=False
        )
        return EvalConfig(
            model=self.model, rollout=self.rollout, task=self.task, eval=section, seed=self.seed
        )


def check_rewards(cfg: SampleConfig, types: set[str]) -> None:
    """Without ``sample.min_reward`` each task type's own check must be among the rewards."""
    if cfg.rewards is None or cfg.sample.min_reward is not None:
        return
    missing = sorted(types - set(cfg.rewards.weights))
    if missing:
        raise ValueError(
            f"rewards.weights {sorted(cfg.rewards.weights)} lacks {missing}, the check that "
            f"accepts a {missing[0]} answer: add it, or set sample.min_reward"
        )


def weights_for(cfg: SampleConfig, task: Task) -> RewardsConfig:
    """The rewards one task is scored with: ``rewards``, or the task's own check."""
    return cfg.rewards or RewardsConfig(weights={task.type: 1.0})


def services_config(cfg: SampleConfig, types: set[str]) -> TrainConfig:
    """The training config :func:`r1_train.services.services` starts the same reward
    deployments and sandbox pool from."""
    rewards = cfg.rewards or RewardsConfig(weights=dict.fromkeys(sorted(types), 1.0))
    try:
        return TrainConfig(
            model=cfg.model,
            rollout=cfg.rollout,
            task=cfg.task,
            rewards=rewards,
            sandbox=cfg.sandbox,
            grpo=GRPOConfig(scale="batch"),  # no groups here: a group of 1 is fine
            run=RunConfig(seed=cfg.seed, progress=False, tensorboard=False),
        )
    except ValidationError as exc:
        msgs = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError("; ".join(msgs)) from None


def load_sample_config(path: Path | None, overrides: Sequence[str] = ()) -> SampleConfig:
    return load_subconfig(SampleConfig, path, overrides, command="sample")


# -- one prompt -------------------------------------------------------------------------------


def prompt_messages(
    task: Task, cfg: SampleConfig, rendered: str, tokenizer: Any
) -> list[dict[str, str]]:
    """The messages the teacher was prompted with, for the SFT row (see the module doc)."""
    if cfg.task.template != "chat":
        return [{"role": "user", "content": rendered}]
    from r1_train.config import AgentConfig
    from r1_train.prompts import chat_messages

    messages = chat_messages(task, AgentConfig())
    again = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if again != rendered:  # r1_train.prompts changed its chat prompt: these rows would lie
        raise RuntimeError(
            f"the SFT row's messages for task {task.id!r} do not render to the prompt the "
            "teacher saw (a tokenizer whose chat template is not a function of the messages)"
        )
    return messages


def verdict(traj: Any, cfg: SampleConfig) -> Verdict:
    """accepted, rejected, or infra_failed (the reward was never computed)."""
    if traj.infra_error:
        return "infra_failed"
    if traj.truncated and cfg.sample.drop_truncated:
        return "rejected"
    if cfg.sample.min_reward is not None:
        ok = traj.reward is not None and traj.reward >= cfg.sample.min_reward
    else:
        ok = traj.reward_parts.get(traj.task.type) == 1.0
    return "accepted" if ok else "rejected"


def kept(answers: Sequence[str], verdicts: Sequence[Verdict], cfg: SampleConfig) -> list[str]:
    """The accepted answers to write, in sampling order: each text once (``sample.dedup``),
    at most ``sample.max_per_prompt``."""
    out: list[str] = []
    for text, v in zip(answers, verdicts, strict=True):
        if v != "accepted" or (cfg.sample.dedup and text in out):
            continue
        if cfg.sample.max_per_prompt is not None and len(out) >= cfg.sample.max_per_prompt:
            break
        out.append(text)
    return out


async def _one_prompt(
    orch: Any,
    writer: Writer,
    cfg: SampleConfig,
    prompt: tuple[int, Task, list[dict[str, str]]],
    requests: Sequence[Any],
    gens: Sequence[Any],
) -> PromptCounts:
    from r1_train.agent_loop import Trajectory
    from r1_train.rewards import score_one

    index, task, messages = prompt
    with _tracer.start_as_current_span(
        SPAN_SAMPLE_PROMPT,
        attributes={"tangram.sample.index": index, "tangram.sample.task_id": task.id},
    ) as span:
        trajs = [
            Trajectory(
                task=task,
                group=index,
                member=j,
                prompt_ids=r.prompt_ids,
                texts=[g.text],
                truncated=g.finish_reason == "length",
            )
            for j, (r, g) in enumerate(zip(requests, gens, strict=True))
        ]
        rewards = weights_for(cfg, task)
        await asyncio.gather(*(score_one(orch, t, rewards, step=0) for t in trajs))
        verdicts = [verdict(t, cfg) for t in trajs]
        answers = kept([t.response for t in trajs], verdicts, cfg)
        rows = [{"messages": [*messages, {"role": "assistant", "content": a}]} for a in answers]
        infra = next((t.infra_error for t in trajs if t.infra_error), None)
        truncated = sum(t.truncated for t in trajs)
        item = writer.add(index, task.id, verdicts, rows, truncated=truncated, infra_error=infra)
        for key in ("n", "accepted", "rejected", "infra_failed", "written", "truncated"):
            span.set_attribute(f"tangram.sample.{key}", getattr(item, key))
        return item


# -- the command ------------------------------------------------------------------------------


async def sample(
    cfg: SampleConfig, *, engine: Any, tokenizer: Any, orch: Any, resume: bool = False
) -> dict[str, Any]:
    """Sample, score and write every prompt not done yet; returns the summary (also written
    to ``<stem>.summary.json``). ``engine`` and ``orch`` come from the caller, as for
    :func:`r1_train.evaluate.evaluate`; :func:`run_sample` opens them."""
    from tqdm import tqdm

    from r1_train.console import progress_stream

    t0 = time.perf_counter()
    tasks, messages, requests = plan(cfg, tokenizer)
    out, n = cfg.sample.out, cfg.n
    progress = prepare(out, resume=resume)
    check_resumable(progress, [t.id for t in tasks], n, out)
    todo = [i for i in range(len(tasks)) if i not in progress.done]
    writer = Writer(out, progress)
    bar = tqdm(
        total=len(tasks),
        initial=len(tasks) - len(todo),
        desc="sample",
        unit="prompt",
        disable=not cfg.sample.progress,
        file=progress_stream(),
    )
    done = dict(progress.done)
    try:
        for start in range(0, len(todo), cfg.sample.batch_prompts):
            chunk = todo[start : start + cfg.sample.batch_prompts]
            with _tracer.start_as_current_span(
                SPAN_SAMPLE_BATCH, attributes={"tangram.sample.prompts": len(chunk)}
            ):
                reqs = [requests[i * n + j] for i in chunk for j in range(n)]
                gens = engine.generate(reqs)  # on CPU it keeps prompts whole per call
                items = await asyncio.gather(
                    *(
                        _one_prompt(
                            orch,
                            writer,
                            cfg,
                            (i, tasks[i], messages[i]),
                            reqs[k * n : (k + 1) * n],
                            gens[k * n : (k + 1) * n],
                        )
                        for k, i in enumerate(chunk)
                    )
                )
            done.update((item.index, item) for item in items)
            bar.update(len(items))
    finally:
        writer.close()
        bar.close()
    summary = {
        **summarise(done.values()),
        "n": n,
        "new_prompts": len(todo),
        "resumed_prompts": len(progress.done),
        "dropped_rows": progress.dropped_rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "out": str(out),
        "counts": str(counts_path(out)),
    }
    summary_path(out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def plan(
    cfg: SampleConfig, tokenizer: Any
) -> tuple[list[Task], list[list[dict[str, str]]], list[Any]]:
    """(tasks, each task's prompt messages, ``n`` requests per task in task order).

    Seeds are functions of ``seed``, the task's index and the sample, so a resumed run samples
    what the uninterrupted one would have. A prompt too long for ``rollout.max_total_tokens``
    is refused here, before an engine starts."""
    from r1_train.evaluate import prompts_of, requests_for
    from r1_train.tasks import tasks_of

    ecfg = cfg.eval_config()
    tasks = tasks_of(cfg.task)[: cfg.sample.limit]
    types: set[str] = {t.type for t in tasks}
    try:
        check_rewards(cfg, types)
        services_config(cfg, types)
    except ValueError as exc:
        raise ConfigError(f"{cfg.task.path or cfg.task.kind}: {exc}") from None
    names, prompts, stop = prompts_of(ecfg, tokenizer)
    requests = requests_for(tokenizer, prompts, ecfg, stop=stop, names=names)
    messages = [prompt_messages(t, cfg, p, tokenizer) for t, p in zip(tasks, prompts, strict=True)]
    return tasks, messages, requests


async def run_sample(cfg: SampleConfig, *, resume: bool = False) -> dict[str, Any]:
    """The whole command: check the config, data and outputs, open the engine and the
    services, sample, close."""
    from transformers import AutoTokenizer

    from r1_train.evaluate import open_engine
    from r1_train.services import services

    progress = prepare(cfg.sample.out, resume=resume)  # an output in the way: refused at once
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    tasks, _, _ = plan(cfg, tokenizer)  # bad data and long prompts: refused before vLLM
    check_resumable(progress, [t.id for t in tasks], cfg.n, cfg.sample.out)
    engine = open_engine(cfg.eval_config())
    try:
        async with services(services_config(cfg, {str(t.type) for t in tasks})) as orch:
            return await sample(cfg, engine=engine, tokenizer=tokenizer, orch=orch, resume=resume)
    finally:
        engine.close()


def cli_main(args: argparse.Namespace) -> int:
    """``r1-train sample``: a bad config, bad data or an output in the way exits 2 (the field,
    or the file and row, named) before anything starts; a reward that raises exits 1."""
    try:
        cfg = load_sample_config(args.config, list(args.overrides))
    except ConfigError as exc:
        print(f"r1-train sample: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r1_train.rewards import RewardError
    from r1_train.sample_io import SampleDataError
    from r1_train.tasks import TaskDataError
    from tangram_core.telemetry import configure_telemetry

    telemetry = configure_telemetry(service_name="r1-train")
    try:
        summary = asyncio.run(run_sample(cfg, resume=args.resume))
    except (ConfigError, SampleDataError, TaskDataError) as exc:
        print(f"r1-train sample: {exc}", file=sys.stderr)
        return 2
    except RewardError as exc:
        print(f"r1-train sample: the run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()
    print(
        f"sample: {summary['prompts']} prompts x {summary['n']} ({summary['new_prompts']} new): "
        f"accepted {summary['accepted']}, rejected {summary['rejected']}, infra_failed "
        f"{summary['infra_failed']} (acceptance {summary['acceptance_rate']:.1%}); wrote "
        f"{summary['written']} rows to {summary['out']} ({summary['seconds']:.1f} s)"
    )
    return 0
