"""``r1-train distill``: logit distillation from a teacher into a student sharing its tokenizer.

    r1-train distill --config FILE.yaml model.path=STUDENT teacher.path=TEACHER \\
        distill.prompts=prompts.txt distill.loss=reverse_kl run.steps=100

At every completion token the student is pulled towards the teacher's whole next-token
distribution (not only the sampled token, as ``sft`` does): forward KL, reverse KL, their mix
or TRL's generalized JSD (:mod:`r1_train.distill_loss`). The sequences come from one of:

* ``distill.path``: a JSONL of chats (``sft``'s ``{"messages": [...]}``; the assistant tokens
  are distilled) or of token rows (``{"prompt_ids": [...], "completion_ids": [...]}``, what
  the teacher sampled in an earlier run: ``RUN_DIR/teacher_samples.jsonl``);
* ``distill.prompts`` (one prompt per line, or JSONL ``{"prompt": ...}``) or a ``task``
  section: the teacher samples ``distill.samples_per_prompt`` continuations of each prompt on
  vLLM once, before training, written to ``RUN_DIR/teacher_samples.jsonl`` (a resumed run
  reads them back). No dataset is needed: the teacher writes its own;
* on-policy (``distill.lmbda`` > 0, TRL's name): that fraction of each step's rows is replaced
  by the student's own continuation of the row's prompt, sampled with transformers'
  ``generate`` on the current weights (simple and exact for small students; a vLLM engine
  with weight sync, as ``run`` uses, would be faster for large ones).

Training is ``sft``'s: the :class:`~r1_train.policy.Policy` (AdamW, schedule, clipping,
dtype), checkpoints and ``--resume`` (:mod:`r1_train.checkpoint`), ``metrics.jsonl``
(:mod:`r1_train.metrics`), a ``tangram.train.step`` span per step and a progress bar; the loss
is a sum over the step's trained tokens divided by their count, so micro-batching does not
change the gradient. The teacher runs in eval mode under ``no_grad`` in the student's dtype.
``distill.trainable`` (parameter-name globs) limits what is trained, e.g. a converted
HySparse model's gates and attention projections only.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from r1_train.config import ModelConfig, OptimConfig, RolloutConfig, RunConfig, TaskConfig
from r1_train.distill_loss import LossName, token_divergence
from r1_train.sft import Example, SFTDataError, load_examples, pad_rows, trained_tokens
from r1_train.subconfig import load_subconfig, section_defaults

SAMPLES_FILE = "teacher_samples.jsonl"


class DistillDataError(SFTDataError):
    """A row or prompt that cannot be distilled on: names the file and the row."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherSection(_Strict):
    path: Path = Field(
        description="Local checkpoint of the teacher (HF layout); it runs in the student's dtype."
    )


class DistillSection(_Strict):
    loss: LossName = Field(
        "forward_kl",
        description="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); "
        "mix: (1-beta) forward + beta reverse; jsd: TRL's generalized JSD.",
    )
    beta: float | None = Field(
        None, ge=0, le=1, description="TRL's beta, for mix and jsd (0: forward KL, 1: reverse)."
    )
    temperature: float = Field(
        1.0, gt=0, description="Both models' logits are divided by it inside the loss."
    )
    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="TRL's lmbda: fraction of each step's rows the student "
        "samples itself (on-policy).",
    )
    path: Path | None = Field(None, description="JSONL of chats or token rows to distill on.")
    prompts: Path | None = Field(
        None, description="Prompts the teacher continues: one per line, or JSONL {'prompt'}."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Teacher samples of each prompt.")
    template: Literal["chat", "plain"] = Field(
        "chat", description="distill.prompts through the chat template, or as plain text."
    )
    max_length: int = Field(512, ge=8, description="Most tokens of one row.")
    batch_size: int = Field(8, ge=1, description="Rows per optimiser step.")
    trainable: tuple[str, ...] = Field(
        ("*",), min_length=1, description="Globs of the parameter names to train; others frozen."
    )

    @model_validator(mode="after")
    def _check(self) -> DistillSection:
        if self.beta is not None and self.loss in ("forward_kl", "reverse_kl"):
            raise ValueError(
                f"distill.beta ({self.beta}) only applies to loss mix or jsd, not {self.loss}; "
                "remove it, or set distill.loss=jsd (TRL's generalized JSD)"
            )
        for name in ("path", "prompts"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"distill.{name} {str(value)!r} does not exist")
        if self.path is not None and self.prompts is not None:
            raise ValueError(
                "distill.path and distill.prompts are both set: distill either on given "
                "sequences (path) or on what the teacher samples from prompts; keep one"
            )
        return self

    @property
    def mix_beta(self) -> float:
        """beta as the loss uses it (0.5, TRL's default, when mix or jsd leave it out)."""
        return 0.5 if self.beta is None else self.beta


class DistillConfig(_Strict):
    """``r1-train distill``'s tree: the student's ``model``, ``optim`` and ``run`` as
    ``r1-train run`` has them, plus ``teacher``, ``distill``, and ``rollout`` (sampling)."""

    model: ModelConfig = Field(description="The student.")
    teacher: TeacherSection
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    distill: DistillSection = Field(default_factory=DistillSection)
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="How the teacher (vLLM) and, on-policy, the student sample.",
    )
    task: TaskConfig | None = Field(None, description="Its prompts, for the teacher to sample.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, tree: Any) -> Any:
        """lr 1e-5 (as ``sft``) and runs/distill, where the file leaves them out."""
        return section_defaults(tree, {("optim", "lr"): 1e-5, ("run", "out_dir"): "runs/distill"})

    @model_validator(mode="after")
    def _source(self) -> DistillConfig:
        sources = [
            name
            for name, on in (
                ("distill.path", self.distill.path is not None),
                ("distill.prompts", self.distill.prompts is not None),
                ("task", self.task is not None),
            )
            if on
        ]
        if len(sources) != 1:
            raise ValueError(
                f"give exactly one source of sequences, not {sources or 'none'}: distill.path "
                "(JSONL chats or token rows), distill.prompts (the teacher samples them) or a "
                "task section (the teacher samples its prompts)"
            )
        return self


def load_distill_config(path: Path | None, overrides: Sequence[str] = ()) -> DistillConfig:
    return load_subconfig(DistillConfig, path, overrides, command="distill")


# -- the models -------------------------------------------------------------------------------


def check_same_vocabulary(student: Path, teacher: Path) -> Any:
    """The student's tokenizer, after checking that the teacher's maps every token to the same
    id and that both models' logits have the same width: distillation compares the two
    distributions id by id, so any difference would train on the wrong tokens."""
    from transformers import AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(student)
    t_tok = AutoTokenizer.from_pretrained(teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(
            tok for tok in set(s_vocab) | set(t_vocab) if s_vocab.get(tok) != t_vocab.get(tok)
        )
        shown = ", ".join(f"{t!r}: {s_vocab.get(t)} vs {t_vocab.get(t)}" for t in differ[:3])
        raise DistillDataError(
            f"the student ({student}, {len(s_vocab)} tokens) and the teacher ({teacher}, "
            f"{len(t_vocab)} tokens) have different tokenizers: {len(differ)} tokens differ "
            f"(student id vs teacher id: {shown}); distillation needs one shared tokenizer"
        )
    widths = [json.loads((Path(p) / "config.json").read_text()).get("vocab_size") for p in
              (student, teacher)]  # fmt: skip
    if widths[0] != widths[1]:
        raise DistillDataError(
            f"the student ({student}) has vocab_size {widths[0]} and the teacher ({teacher}) "
            f"{widths[1]}: their logits cannot be compared position by position"
        )
    return s_tok


def load_teacher(path: Path, dtype: Any, device: Any) -> Any:
    """The frozen teacher: eval mode, no gradients, in the student's dtype."""
    from transformers import AutoModelForCausalLM

    from r1_train.policy import register_architecture

    register_architecture(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    return model.train(False).requires_grad_(False)


def apply_trainable(model: Any, globs: Sequence[str]) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of ``globs``; returns (trained, all)
    parameter counts. A glob that matches nothing is refused with some names to pick from:
    a typo would otherwise silently train less than meant."""
    names = [n for n, _ in model.named_parameters()]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            from r1_train.config import ConfigError

            shown = ", ".join(names[:6])
            raise ConfigError(
                f"distill.trainable glob {glob!r} matches no parameter of the student; its "
                f"names look like: {shown}, ... ({len(names)} in all)"
            )
    trained = total = 0
    for name, param in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, g) for g in globs)
        param.requires_grad_(keep)
        total += param.numel()
        trained += param.numel() if keep else 0
    return trained, total


# -- data -------------------------------------------------------------------------------------


class TokenRow(_Strict):
    """One sampled sequence: the prompt's ids and the completion's (what is distilled)."""

    prompt: str = ""
    prompt_ids: list[int] = Field(min_length=1)
    completion_ids: list[int] = Field(min_length=1)
    text: str = ""
    finish_reason: str = ""


def _first_row(path: Path) -> Any:
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def load_sequences(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """``distill.path``: chats (``sft``'s reader: the assistant tokens are distilled) or token
    rows (the completion is distilled), told apart by the first row; a bad row raises
    :class:`SFTDataError` naming the file and the row."""
    first = _first_row(path)
    limit = "distill.max_length"
    if not (isinstance(first, dict) and "prompt_ids" in first):
        return load_examples(path, tokenizer, max_length, limit_name=limit)
    vocab = len(tokenizer)

    def parse(raw: Any) -> tuple[list[int], list[bool]]:
        row = TokenRow.model_validate(raw)
        ids = row.prompt_ids + row.completion_ids
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(
                f"a token id outside the tokenizer's {vocab} ids; was it sampled by a model "
                "with another tokenizer?"
            )
        return ids, [False] * len(row.prompt_ids) + [True] * len(row.completion_ids)

    return load_examples(path, tokenizer, max_length, limit_name=limit, parse=parse)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (blank lines skipped), or JSONL rows ``{"prompt": ...}``."""
    prompts = []
    jsonl = Path(path).suffix == ".jsonl"
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistillDataError(f"{path}: row {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DistillDataError(f"{path}: row {n}: needs a string 'prompt'")
        if set(row) - {"prompt"}:
            raise DistillDataError(f"{path}: row {n}: unknown keys {sorted(set(row) - {'prompt'})}")
        prompts.append(row["prompt"])
    if not prompts:
        raise DistillDataError(f"{path}: no prompts in the file")
    return prompts


def prompt_texts(cfg: DistillConfig, tokenizer: Any) -> tuple[str, list[str]]:
    """(where they come from, the rendered prompts) of ``distill.prompts`` or ``task``."""
    if cfg.distill.prompts is not None:
        raw = read_prompts(cfg.distill.prompts)
        if cfg.distill.template == "plain":
            return str(cfg.distill.prompts), raw
        if getattr(tokenizer, "chat_template", None) is None:
            raise DistillDataError(
                f"{cfg.distill.prompts}: distill.template 'chat' needs a tokenizer with a chat "
                "template; this student has none (use distill.template=plain)"
            )
        return str(cfg.distill.prompts), [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
            )
            for p in raw
        ]
    from r1_train.config import AgentConfig
    from r1_train.prompts import render_prompt
    from r1_train.tasks import tasks_of

    assert cfg.task is not None  # the config validator guarantees a source
    tasks = tasks_of(cfg.task)
    return f"task {cfg.task.kind}", [
        render_prompt(t, cfg.task.template, AgentConfig(), tokenizer) for t in tasks
    ]


def _sample_seed(seed: int, prompt: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt * 10_007 + sample) % (2**31 - 1)


def teacher_samples(cfg: DistillConfig, tokenizer: Any, dtype: str) -> Path:
    """The teacher's continuations of the prompts, sampled once on vLLM and written to
    ``RUN_DIR/teacher_samples.jsonl`` as token rows; a resumed run reads that file back, so
    its data stream is the one the interrupted run had."""
    out = Path(cfg.run.out_dir) / SAMPLES_FILE
    if cfg.run.resume and out.is_file():
        return out
    from r1_train.rollout import GenRequest, VLLMEngine

    where, prompts = prompt_texts(cfg, tokenizer)
    total, requests, owners = cfg.rollout.max_total_tokens, [], []
    for i, text in enumerate(prompts):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        room = min(
            cfg.rollout.max_new_tokens, total - len(ids) - 1, cfg.distill.max_length - len(ids)
        )
        if room < 1:
            raise DistillDataError(
                f"{where}: prompt {i + 1} has {len(ids)} tokens and leaves no room in "
                f"rollout.max_total_tokens ({total}) and distill.max_length "
                f"({cfg.distill.max_length}); raise them or shorten the prompt"
            )
        for j in range(cfg.distill.samples_per_prompt):
            requests.append(GenRequest(ids, room, _sample_seed(cfg.run.seed, i, j)))
            owners.append(i)
    print(f"distill: the teacher samples {len(requests)} sequences from {where} (vLLM)")
    engine = VLLMEngine(cfg.teacher.path, cfg.rollout, seed=cfg.run.seed, dtype=dtype)
    try:
        gens = engine.generate(requests)
    finally:
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{SAMPLES_FILE}.tmp")
    with tmp.open("w") as f:
        for req, gen, i in zip(requests, gens, owners, strict=True):
            if not gen.token_ids:
                continue
            row = TokenRow(
                prompt=prompts[i],
                prompt_ids=req.prompt_ids,
                completion_ids=gen.token_ids,
                text=gen.text,
                finish_reason=gen.finish_reason,
            )
            f.write(row.model_dump_json() + "\n")
    tmp.replace(out)
    return out


def on_policy_rows(
    model: Any, rows: Sequence[Example], cfg: DistillConfig, step: int, eos: int | None
) -> list[Example]:
    """The first ``round(lmbda * len(rows))`` rows replaced by the student's own continuation of
    their prompts (everything before the first trained token), sampled with transformers'
    ``generate`` under a seed of (run seed, step, row); the torch RNG of training is left as
    it was. TRL draws the whole batch on-policy with probability lmbda; a fixed fraction of
    every step is the same in expectation and keeps a resumed run's stream exact."""
    import torch

    count = round(cfg.distill.lmbda * len(rows))
    if count == 0:
        return list(rows)
    was_training = model.training
    model.train(False)
    device = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for b, row in enumerate(rows[:count]):
            start = row.trained.index(True) if True in row.trained else len(row.ids)
            prompt = row.ids[: max(start, 1)]
            room = min(cfg.rollout.max_new_tokens, cfg.distill.max_length - len(prompt))
            if room < 1:
                out.append(row)
                continue
            torch.manual_seed(_sample_seed(cfg.run.seed, step, b))
            ids = model.generate(
                torch.tensor([prompt], device=device),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
                do_sample=True,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k if cfg.rollout.top_k > 0 else 0,
                max_new_tokens=room,
                pad_token_id=eos if eos is not None else 0,
                eos_token_id=eos,
            )[0, len(prompt) :].tolist()
            if not ids:
                out.append(row)
                continue
            out.append(Example(prompt + ids, [False] * len(prompt) + [True] * len(ids), row.row))
    model.train(was_training)
    return out + list(rows[count:])


# -- the loss ---------------------------------------------------------------------------------


def distill_loss_and_backward(
    student: Any,
    teacher: Any,
    rows: Sequence[Example],
    micro_batch_size: int,
    pad_id: int,
    *,
    loss: LossName,
    beta: float = 0.5,
    temperature: float = 1.0,
    n_tokens: int | None = None,
) -> tuple[float, int]:
    """Backward of the mean per-token divergence over the trained tokens of ``rows``; returns
    (the loss, the number of trained tokens). Each micro-batch's sum is divided by the whole
    step's count, so the gradient is the same however ``rows`` is split. Only the trained
    positions' logits go through the softmaxes: a vocabulary-wide fp32 copy of every prompt
    position would dominate memory."""
    import torch

    n_tokens = trained_tokens(rows) if n_tokens is None else n_tokens
    if n_tokens == 0:
        raise ValueError("this step's rows hold no trained tokens after the first position")
    device = next(student.parameters()).device
    total = 0.0
    for s in range(0, len(rows), micro_batch_size):
        ids, mask = pad_rows(rows[s : s + micro_batch_size], pad_id, device)
        keep = mask[:, 1:]  # logits at p predict the token at p + 1
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1][keep]
        s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1][keep]
        div = token_divergence(s_logits, t_logits, loss=loss, beta=beta, temperature=temperature)
        part = div.sum() / n_tokens
        torch.autograd.backward(part)
        total += float(part.detach())
    return total, n_tokens


# -- the command ------------------------------------------------------------------------------

#: Called after each step with (step, policy); what it returns joins the step's metrics. The
#: HySparse recovery bench measures perplexity with it.
StepHook = Callable[[int, Any], dict[str, float]]


def train_distill(cfg: DistillConfig, *, on_step: StepHook | None = None) -> list[dict[str, Any]]:
    """Run ``run.steps`` optimiser steps of distillation; returns the metrics rows written."""
    import torch
    from opentelemetry import trace
    from tqdm import tqdm

    from r1_train.checkpoint import restore_trainer_state, save_checkpoint
    from r1_train.config import GRPOConfig
    from r1_train.metrics import MetricsWriter, trim_step_logs
    from r1_train.policy import Policy, pick_dtype
    from r1_train.sft import batch_for_step, optimizer_step, resume_point
    from tangram_core import semconv as sc

    run_dir = Path(cfg.run.out_dir)
    model_cfg, start, resume_from = resume_point(cfg.model, cfg.run)
    tokenizer = check_same_vocabulary(model_cfg.path, cfg.teacher.path)
    dtype = pick_dtype(cfg.model)
    source = cfg.distill.path
    t0 = time.perf_counter()
    if source is None:  # the teacher writes the data, before either model loads here
        source = teacher_samples(
            cfg, tokenizer, "bfloat16" if dtype == torch.bfloat16 else "float32"
        )
    sampling_s = time.perf_counter() - t0
    examples = load_sequences(source, tokenizer, cfg.distill.max_length)
    torch.manual_seed(cfg.run.seed)
    policy = Policy(model_cfg, cfg.optim, GRPOConfig(), total_steps=cfg.run.steps, temperature=1.0)
    trained_params, _ = apply_trainable(policy.model, cfg.distill.trainable)
    if resume_from is not None:
        restore_trainer_state(resume_from, policy)
    teacher = load_teacher(cfg.teacher.path, policy.dtype, policy.device)
    trim_step_logs(run_dir, start)
    metrics = MetricsWriter(run_dir, tensorboard=cfg.run.tensorboard)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tracer = trace.get_tracer("r1_train")
    rows_out = []
    d = cfg.distill
    bar = tqdm(
        range(start, cfg.run.steps), desc="distill", unit="step", disable=not cfg.run.progress
    )
    try:
        for step in bar:
            with tracer.start_as_current_span(sc.SPAN_TRAIN_STEP, attributes={sc.STEP_ID: step}):
                t1 = time.perf_counter()
                rows = batch_for_step(examples, step, d.batch_size, cfg.run.seed)
                rows = on_policy_rows(policy.model, rows, cfg, step, tokenizer.eos_token_id)
                t_gen = time.perf_counter() - t1
                loss, n_tokens = distill_loss_and_backward(
                    policy.model,
                    teacher,
                    rows,
                    cfg.optim.micro_batch_size,
                    pad,
                    loss=d.loss,
                    beta=d.mix_beta,
                    temperature=d.temperature,
                )
                grad_norm, lr = optimizer_step(policy, cfg.optim.grad_clip)
                row: dict[str, Any] = {
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "trained_tokens": n_tokens,
                    "tokens": sum(len(r.ids) for r in rows),
                    "on_policy_rows": round(d.lmbda * len(rows)),
                    "update_skipped": float(not math.isfinite(grad_norm)),
                    "time/generate": t_gen,
                    "time/step": time.perf_counter() - t1,
                }
                if step == start:  # once per run: what is trained, what sampling cost
                    row["trained_params"] = trained_params
                    row["time/teacher_sampling"] = sampling_s
                if on_step is not None:
                    row.update(on_step(step, policy))
                metrics.write(step, row)
                rows_out.append({"step": step, **row})
                bar.set_postfix(loss=f"{loss:.4f}")
            last = step + 1 == cfg.run.steps
            if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                save_checkpoint(run_dir, step + 1, policy, tokenizer)
    finally:
        bar.close()
        metrics.close()
    return rows_out
