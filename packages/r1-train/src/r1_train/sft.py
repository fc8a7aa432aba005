"""``r1-train sft``: supervised fine-tuning on JSONL chat data, loss on assistant tokens only.

    r1-train sft --config FILE.yaml sft.path=data/chats.jsonl run.steps=200

The cold start before GRPO, and the last stage of distillation (R1's recipe). One row per line::

    {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]}

Each row is rendered with the tokenizer's chat template; the tokens of every assistant message
(its content and end-of-turn marker, not the role header the template adds before it) are
trained on, nothing else. The loss is the mean token cross-entropy over the whole step's
assistant tokens, so how the step is split into micro-batches does not change the gradient.

The model, AdamW, its schedule, clipping, checkpoints (``checkpoint-NNNNNN``, resumable with
``run.resume``), ``metrics.jsonl`` and a ``tangram.train.step`` span per step are those of
``r1-train run``: the :class:`~r1_train.policy.Policy` class, :mod:`r1_train.checkpoint` and
:mod:`r1_train.metrics`, under the same ``model``, ``optim`` and ``run`` sections.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1_train.config import ModelConfig, OptimConfig, RolloutConfig, RunConfig, TaskConfig
from r1_train.eval_section import EvalSection, check_periodic_eval, eval_due
from r1_train.evaluate import EvalConfig
from r1_train.jsonl import field_errors, json_rows
from r1_train.subconfig import load_subconfig, section_defaults


class SFTDataError(ValueError):
    """A row that cannot be trained on: names the file and the row."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SFTSection(_Strict):
    path: Path = Field(description="JSONL, one {'messages': [...]} per line.")
    max_length: int = Field(512, ge=8, description="Most tokens of one row (or packed row).")
    batch_size: int = Field(8, ge=1, description="Conversations per optimiser step.")
    packing: bool = Field(
        False,
        description="Concatenate whole conversations into rows of up to max_length tokens "
        "(fewer pad tokens; attention then crosses conversations within a row).",
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate (the eval section) every N steps and at the end; 0: never."
    )

    @model_validator(mode="after")
    def _exists(self) -> SFTSection:
        if not self.path.is_file():
            raise ValueError(f"sft.path {str(self.path)!r} does not exist")
        return self


class SFTConfig(_Strict):
    """``r1-train sft``'s tree: ``model``, ``optim`` and ``run`` as ``r1-train run`` has them,
    plus ``sft``."""

    model: ModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    sft: SFTSection
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Sampling for sft.eval_every."
    )
    task: TaskConfig = Field(default_factory=TaskConfig, description="eval.benchmark 'tasks'.")
    eval: EvalSection | None = Field(None, description="What sft.eval_every evaluates.")

    @model_validator(mode="before")
    @classmethod
    def _sft_defaults(cls, tree: Any) -> Any:
        """SFT's own defaults where the file leaves them out: lr 1e-5 (GRPO's 1e-6 barely
        moves a model on a small SFT set) and runs/sft (a GRPO run's folder would be mixed)."""
        return section_defaults(tree, {("optim", "lr"): 1e-5, ("run", "out_dir"): "runs/sft"})

    @model_validator(mode="after")
    def _eval(self) -> SFTConfig:
        check_periodic_eval("sft.eval_every", self.sft.eval_every, self.eval)
        return self

    def eval_config(self) -> EvalConfig:
        """The evaluation of the model being trained, as ``r1-train eval`` would run it."""
        assert self.eval is not None  # the validator guarantees it when eval_every is set
        return EvalConfig(
            model=self.model,
            rollout=self.rollout,
            task=self.task,
            eval=self.eval,
            seed=self.run.seed,
        )


def load_sft_config(path: Path | None, overrides: Sequence[str] = ()) -> SFTConfig:
    return load_subconfig(SFTConfig, path, overrides, command="sft")


# -- data -------------------------------------------------------------------------------------


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Conversation(_Strict):
    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_assistant(self) -> Conversation:
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("no assistant message: nothing to train on")
        return self


@dataclass(frozen=True)
class Example:
    """One tokenised conversation: ids and, per id, whether it is trained on."""

    ids: list[int]
    trained: list[bool]
    row: int


def _ids(tokenizer: Any, messages: list[dict[str, str]], *, open_turn: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenise(conv: Conversation, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """The conversation's ids with the assistant tokens marked.

    Each assistant message's tokens are the difference between the rendering up to it (with
    the template's generation prompt, i.e. the assistant header) and the rendering including
    it. That needs a template whose renderings of a conversation's prefixes are prefixes of
    its rendering; one that is not is refused rather than trained on wrong tokens."""
    msgs = [m.model_dump() for m in conv.messages]
    ids = _ids(tokenizer, msgs, open_turn=False)
    trained = [False] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _ids(tokenizer, msgs[:i], open_turn=True) if i else []
        upto = _ids(tokenizer, msgs[: i + 1], open_turn=False)
        if ids[: len(upto)] != upto or upto[: len(start)] != start:
            raise ValueError(
                f"the chat template does not render message {i}'s prefix as a prefix of the "
                "conversation, so its assistant tokens cannot be told apart"
            )
        for p in range(len(start), len(upto)):
            trained[p] = True
    return ids, trained


def load_examples(
    path: Path,
    tokenizer: Any,
    max_length: int,
    *,
    limit_name: str = "sft.max_length",
    parse: Callable[[Any], tuple[list[int], list[bool]]] | None = None,
) -> list[Example]:
    """Every row of ``path``, tokenised; a bad row raises :class:`SFTDataError` naming it.

    ``parse`` turns one JSON row into (ids, trained), raising ``ValueError`` (or a pydantic
    ``ValidationError``) for a bad one; the default reads chats. ``distill`` passes its
    token-row reader and its own ``limit_name``, the field a too-long row is told to raise."""
    if parse is None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise SFTDataError(f"{path}: the model's tokenizer has no chat template to render rows")

        def parse(row: Any) -> tuple[list[int], list[bool]]:
            return tokenise(Conversation.model_validate(row), tokenizer)

    out = []
    for n, row in json_rows(path, SFTDataError):
        try:
            ids, trained = parse(row)
        except ValidationError as exc:
            raise SFTDataError(f"{path}: row {n}: {field_errors(exc)}") from None
        except ValueError as exc:
            raise SFTDataError(f"{path}: row {n}: {exc}") from None
        if len(ids) > max_length:
            raise SFTDataError(
                f"{path}: row {n}: {len(ids)} tokens, more than {limit_name} ({max_length}); "
                f"raise {limit_name} or shorten the row"
            )
        out.append(Example(ids, trained, n))
    if not out:
        raise SFTDataError(f"{path}: no rows in the file")
    return out


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Whole conversations concatenated, in order, into rows of at most ``max_length``; a
    packed row is named by the file row it starts with."""
    rows: list[Example] = []
    current: list[Example] = []
    for ex in examples:
        if current and sum(len(e.ids) for e in current) + len(ex.ids) > max_length:
            rows.append(_joined(current))
            current = []
        current.append(ex)
    if current:
        rows.append(_joined(current))
    return rows


def _joined(parts: Sequence[Example]) -> Example:
    ids = [i for e in parts for i in e.ids]
    trained = [t for e in parts for t in e.trained]
    return Example(ids, trained, parts[0].row)


def batch_for_step(examples: Sequence[Example], step: int, size: int, seed: int) -> list[Example]:
    """The step's rows: epochs of a seeded shuffle, so a resumed run sees the same stream."""
    n = len(examples)
    out = []
    for i in range(step * size, (step + 1) * size):
        epoch, pos = divmod(i, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(examples[order[pos]])
    return out


# -- the loss ---------------------------------------------------------------------------------


def trained_tokens(rows: Sequence[Example]) -> int:
    """The tokens the loss is taken on (position 0 is never predicted)."""
    return sum(sum(r.trained[1:]) for r in rows)


def pad_rows(rows: Sequence[Example], pad_id: int, device: Any = "cpu") -> tuple[Any, Any]:
    """Right-padded ``[b, L]`` ids and trained-token mask of ``rows`` (no attention mask is
    needed: in a causal decoder real tokens never see the pads after them)."""
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
        mask[b, : len(r.ids)] = torch.tensor(r.trained)
    return ids.to(device), mask.to(device)


def optimizer_step(policy: Any, grad_clip: float) -> tuple[float, float]:
    """Clip, step AdamW (skipped when the gradient norm is not finite: the weights and moments
    stay), advance the schedule, zero the gradients; returns (grad norm, lr used)."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    grad_norm = float(full() if callable(full) else norm)
    lr = float(policy.scheduler.get_last_lr()[0])
    if math.isfinite(grad_norm):
        policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def sft_loss_and_backward(
    model: Any,
    rows: Sequence[Example],
    micro_batch_size: int,
    pad_id: int,
    *,
    n_tokens: int | None = None,
    grad_scale: float = 1.0,
    micro_batches: int = 0,
) -> tuple[float, int]:
    """Backward of the mean cross-entropy over the assistant tokens of ``rows``; returns
    (the loss, the number of trained tokens). Each micro-batch's token sum is divided by the
    whole step's count, so the gradient is the same however ``rows`` is split.

    Data-parallel ranks pass the whole step's ``n_tokens``, ``grad_scale`` = world size (the
    all-reduce averages) and ``micro_batches``, the most any rank runs: a rank with fewer runs
    passes of weight 0 to make up the difference, because FSDP2 gathers parameters in every
    forward and a rank that skipped one would leave the others waiting."""
    import torch
    import torch.nn.functional as F

    n_tokens = trained_tokens(rows) if n_tokens is None else n_tokens
    if n_tokens == 0:
        raise ValueError("this step's rows hold no assistant tokens after the first position")
    total = 0.0
    device = next(model.parameters()).device
    chunks = [rows[s : s + micro_batch_size] for s in range(0, len(rows), micro_batch_size)]
    for _ in range(len(chunks), micro_batches):
        dummy = torch.full((1, 2), pad_id, device=device)
        out = model(input_ids=dummy, use_cache=False).logits
        torch.autograd.backward(out.sum() * 0.0)  # the collectives of a pass, no gradient
    for chunk in chunks:
        ids, mask = pad_rows(chunk, pad_id, device)
        # right padding in a causal decoder: real tokens never see the pads, no mask needed
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = (nll * keep).sum() / n_tokens
        torch.autograd.backward(loss * grad_scale if grad_scale != 1.0 else loss)
        total += float(loss.detach())
    return total, n_tokens


class _Gathered:
    """What :func:`~r1_train.checkpoint.save_checkpoint` writes under FSDP2: the weights and
    trainer state every rank gathered (collectives), written by rank 0 in the one-process
    format, so a checkpoint resumes on any number of ranks."""

    def __init__(self, policy: Any) -> None:
        self.config = policy.model.config
        self.weights = {k: v.detach().cpu().contiguous() for k, v in policy.engine_state().items()}
        self.state: dict[str, Any] = policy.trainer_state()

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        save_file(self.weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def trainer_state(self) -> dict[str, Any]:
        return self.state


# -- the command ------------------------------------------------------------------------------


class PeriodicEval:
    """``sft.eval_every``: the trained weights go into a vLLM engine (started at the first
    evaluation, kept for the run) and ``r1-train eval``'s :func:`~r1_train.evaluate.evaluate`
    runs on it with a sandbox pool of its own. Its scores join the step's metrics as
    ``eval/<name>``, and the report goes to ``run.out_dir/eval/step-NNNNNN``."""

    def __init__(self, cfg: SFTConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.eval_cfg = cfg.eval_config()
        self.engine: Any = None
        from r1_train.evaluate import check_prompts_fit

        check_prompts_fit(self.eval_cfg, tokenizer)

    def due(self, step: int) -> bool:
        return eval_due(step, self.cfg.sft.eval_every, self.cfg.run.steps)

    def __call__(self, step: int, policy: Any, *, lead: bool = True) -> dict[str, float]:
        """Evaluate the weights after ``step``; under FSDP2 every rank gathers them (a
        collective) and rank 0 (``lead``) evaluates."""
        import asyncio

        from r1_train.evaluate import evaluate, open_engine, sandbox_orchestrator, write_report

        state = policy.engine_state()
        if not lead:
            return {}
        if self.engine is None:
            self.engine = open_engine(self.eval_cfg)
        self.engine.sync_weights(state, step + 1)

        async def go() -> Any:
            async with sandbox_orchestrator(self.eval_cfg.eval.workers) as orch:
                return await evaluate(
                    self.eval_cfg, engine=self.engine, tokenizer=self.tokenizer, orch=orch
                )

        report, scored = asyncio.run(go())
        write_report(Path(self.cfg.run.out_dir) / "eval" / f"step-{step + 1:06d}", report, scored)
        return {f"eval/{name}": value for name, value in report.scores.items()}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def resume_point(model: ModelConfig, run: RunConfig) -> tuple[ModelConfig, int, Path | None]:
    """(the model to load, the first step, the checkpoint resumed from): with ``run.resume``
    the newest complete checkpoint in ``run.out_dir`` and the step after it, else ``model``
    from step 0. Shared by ``sft`` and ``distill``."""
    from r1_train.checkpoint import latest_checkpoint, next_step

    found = latest_checkpoint(Path(run.out_dir)) if run.resume else None
    if found is None:
        return model, 0, None
    return ModelConfig(path=found, dtype=model.dtype), next_step(found), found


def train_sft(cfg: SFTConfig) -> list[dict[str, Any]]:
    """Run ``run.steps`` optimiser steps; returns the metrics rows written.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks train data-parallel on FSDP2
    (:mod:`r1_train.distributed`): each takes its contiguous share of the step's
    conversations with the whole step's token count, so the step equals the one-process step;
    rank 0 writes the metrics, the checkpoints and runs the evaluations."""
    import torch
    from opentelemetry import trace
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from r1_train.checkpoint import restore_trainer_state, save_checkpoint
    from r1_train.config import GRPOConfig
    from r1_train.metrics import MetricsWriter, trim_step_logs
    from r1_train.policy import Policy
    from tangram_core import semconv as sc

    dp = _data_parallel(cfg)
    lead = dp is None or dp.rank == 0
    run_dir = Path(cfg.run.out_dir)
    model_cfg, start, resume_from = resume_point(cfg.model, cfg.run)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
    examples = load_examples(cfg.sft.path, tokenizer, cfg.sft.max_length)  # before the model
    if cfg.sft.packing:
        examples = pack(examples, cfg.sft.max_length)
    evaluator = PeriodicEval(cfg, tokenizer) if cfg.sft.eval_every else None
    torch.manual_seed(cfg.run.seed)
    # GRPO's settings are unused here: beta 0 means no reference model is loaded
    policy = Policy(model_cfg, cfg.optim, GRPOConfig(), total_steps=cfg.run.steps, temperature=1.0)
    if dp is not None:
        from r1_train.distributed import shard_policy

        shard_policy(policy)
    if resume_from is not None:
        restore_trainer_state(resume_from, policy)
    metrics = None
    if lead:
        trim_step_logs(run_dir, start)
        metrics = MetricsWriter(run_dir, tensorboard=cfg.run.tensorboard)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tracer = trace.get_tracer("r1_train")
    rows_out = []
    steps = range(start, cfg.run.steps)
    bar = tqdm(steps, desc="sft", unit="step", disable=not (cfg.run.progress and lead))
    try:
        for step in bar:
            with tracer.start_as_current_span(sc.SPAN_TRAIN_STEP, attributes={sc.STEP_ID: step}):
                t0 = time.perf_counter()
                rows = batch_for_step(examples, step, cfg.sft.batch_size, cfg.run.seed)
                loss, n_tokens = _backward(policy.model, rows, cfg, pad, dp)
                grad_norm, lr = optimizer_step(policy, cfg.optim.grad_clip)
                row = {
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "trained_tokens": n_tokens,
                    "tokens": sum(len(r.ids) for r in rows),
                    "update_skipped": float(not math.isfinite(grad_norm)),
                    "time/step": time.perf_counter() - t0,
                }
                if evaluator is not None and evaluator.due(step):
                    t1 = time.perf_counter()
                    row.update(evaluator(step, policy, lead=lead))
                    row["time/eval"] = time.perf_counter() - t1
                if metrics is not None:
                    metrics.write(step, row)
                rows_out.append({"step": step, **row})
                bar.set_postfix(loss=f"{loss:.4f}")
            last = step + 1 == cfg.run.steps
            if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                source = policy if dp is None else _Gathered(policy)  # collectives: every rank
                if lead:
                    save_checkpoint(run_dir, step + 1, source, tokenizer)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if evaluator is not None:
            evaluator.close()
        if dp is not None:
            from r1_train.distributed import close_data_parallel

            close_data_parallel()
    return rows_out


def _data_parallel(cfg: SFTConfig) -> Any:
    """This rank under torchrun, or None in one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if cfg.sft.batch_size < world:
        from r1_train.config import ConfigError

        raise ConfigError(
            f"sft.batch_size ({cfg.sft.batch_size}) must be at least the number of ranks "
            f"({world}): every rank trains on its share of each step; raise sft.batch_size"
        )
    from r1_train.distributed import init_data_parallel

    return init_data_parallel()


def _backward(
    model: Any, rows: list[Example], cfg: SFTConfig, pad: int, dp: Any
) -> tuple[float, int]:
    """This process's share of the step's backward; returns the whole step's loss and tokens."""
    mb = cfg.optim.micro_batch_size
    if dp is None:
        return sft_loss_and_backward(model, rows, mb, pad)
    import torch
    import torch.distributed as dist

    total = trained_tokens(rows)
    most = math.ceil(math.ceil(len(rows) / dp.world) / mb)
    mine = rows[dp.share(len(rows))]
    loss, _ = sft_loss_and_backward(
        model, mine, mb, pad, n_tokens=total, grad_scale=float(dp.world), micro_batches=most
    )
    summed = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(summed)  # each rank's part is its tokens' sum over the whole step's count
    return float(summed[0]), total
