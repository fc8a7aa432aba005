"""The trainable side: the policy, its frozen reference, and one GRPO optimisation step.

Sequences are packed right-padded as ``prompt + completion``; log-probs are taken only at the
completion positions (the logits at position p predict token p + 1). Micro-batches use the
whole batch's sequence and token counts as denominators, so the gradient does not depend on
how the batch is split (see :mod:`r1_train.grpo`), except under ``bnpo``, whose per-micro-batch
normalisation is TRL's definition.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1_train.config import GRPOConfig, ModelConfig, OptimConfig
from r1_train.grpo import (
    LossStats,
    Mismatch,
    importance_weights,
    nonfinite,
    policy_loss,
    sampler_mismatch,
    token_logprobs,
)
from r1_train.nonfinite import NonFiniteError

#: Entry-point group: ``model_type = "package.module:function"``; the function registers the
#: model type with transformers' auto classes (hysparse-vllm declares ``hysparse``).
MODEL_TYPE_ENTRY_POINTS = "tangram.transformers_models"


def register_architecture(path: Path) -> None:
    """Make transformers know a checkpoint's ``model_type`` when an installed package provides
    it, through the ``tangram.transformers_models`` entry point: r1-train names no such
    package (HySparse checkpoints come from hysparse-vllm, which stands alone)."""
    import json
    from importlib.metadata import entry_points

    from transformers import CONFIG_MAPPING

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if not model_type or model_type in CONFIG_MAPPING:
        return
    found = [ep for ep in entry_points(group=MODEL_TYPE_ENTRY_POINTS) if ep.name == model_type]
    if not found:
        hint = " (pip install packages/hysparse-vllm)" if model_type == "hysparse" else ""
        raise RuntimeError(
            f"{path} is a {model_type!r} checkpoint, which transformers does not know and no "
            f"installed package registers (entry point group {MODEL_TYPE_ENTRY_POINTS!r}): "
            f"install the package that provides it{hint}"
        )
    found[0].load()()


def pick_dtype(cfg: ModelConfig) -> torch.dtype:
    """bf16 only where matmuls run natively in it (CUDA with bf16, or a CPU with AMX/AVX512-BF16);
    elsewhere fp32, since emulated bf16 is slower and noisier than fp32."""
    if cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class Batch:
    """Right-padded tensors for a list of trajectories."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 on trained tokens
    prompt_lens: list[int]
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None  # [B, T] what the engine reported when sampling

    def to_(self, device: torch.device) -> None:
        """Move every tensor to ``device``, in place (the log-probs filled in later stay with
        the batch the caller holds)."""
        for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask"):
            setattr(self, name, getattr(self, name).to(device))
        self.advantages = self.advantages.to(device)
        for name in ("old_logp", "ref_logp", "sampler_logp"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))


def make_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    masks: list[list[int]],
    advantages: list[float],
    pad_id: int,
    sampler_logprobs: list[list[float]] | None = None,
) -> Batch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width, t_max = max(lengths), max(len(c) for c in completions)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    comp = torch.full((len(prompts), t_max), pad_id, dtype=torch.long)
    cmask = torch.zeros((len(prompts), t_max))
    for b, (p, c, m) in enumerate(zip(prompts, completions, masks, strict=True)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attn[b, : len(p) + len(c)] = 1
        comp[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[b, : len(c)] = torch.tensor(m, dtype=torch.float)
    batch = Batch(ids, attn, comp, cmask, [len(p) for p in prompts], torch.tensor(advantages))
    if sampler_logprobs is not None:
        batch.sampler_logp = torch.zeros((len(prompts), t_max))
        for b, lp in enumerate(sampler_logprobs):
            batch.sampler_logp[b, : len(lp)] = torch.tensor(lp, dtype=torch.float)
    return batch


def completion_logprobs(model: Any, batch: Batch, rows: slice, temperature: float) -> torch.Tensor:
    """``[b, T]`` log-probs of the completion tokens of ``rows`` under ``model``.

    No attention mask is passed: padding is on the right only, and in a causal decoder a real
    token never attends to a later position, so its logits are the unpadded ones. That also
    serves models that refuse padding masks (HySparse's block selection does).

    Only the positions from the shortest prompt's end on get logits (``logits_to_keep``): the
    LM head over prompt tokens is wasted work, a fifth of a small model's FLOPs per token and
    the largest activation of the backward. A model that ignores the argument returns every
    position, which the offset below absorbs."""
    ids = batch.input_ids[rows]
    prompt_lens = batch.prompt_lens[rows]
    keep = ids.shape[1] - (min(prompt_lens) - 1)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    first = ids.shape[1] - logits.shape[1]  # the sequence position of logits[:, 0]
    t_max = batch.completion_ids.shape[1]
    aligned = []
    for b, p in enumerate(prompt_lens):
        row = logits[b, p - 1 - first : p - 1 - first + t_max]
        if row.shape[0] < t_max:  # a short completion near the right edge: pad, masked anyway
            row = torch.cat([row, row.new_zeros(t_max - row.shape[0], row.shape[1])])
        aligned.append(row)
    return token_logprobs(torch.stack(aligned), batch.completion_ids[rows], temperature=temperature)


class Policy:
    """A transformers causal LM being trained, with AdamW, a schedule and a frozen reference."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        grpo: GRPOConfig,
        *,
        total_steps: int,
        temperature: float,
        reference: ModelConfig | None = None,
        device: str = "cpu",
    ) -> None:
        """``reference`` is the frozen KL anchor, the run's initial model; it defaults to
        ``model_cfg`` and must be given when resuming, or the anchor would move.

        ``device``: where the policy computes ("cuda" for a cluster rank given a GPU); batches
        are moved there as they arrive. The one-process run stays on the CPU, because its vLLM
        engine holds the GPU."""
        from transformers import AutoModelForCausalLM

        self.dtype = pick_dtype(model_cfg)
        self.device = torch.device(device)
        register_architecture(model_cfg.path)
        self.model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=self.dtype)
        self.model.to(self.device)
        self.model.train()
        self.ref = None
        if grpo.beta > 0:
            if reference is None or reference.path == model_cfg.path:
                self.ref = copy.deepcopy(self.model)
            else:
                self.ref = AutoModelForCausalLM.from_pretrained(reference.path, dtype=self.dtype)
            self.ref.to(self.device)
            self.ref.train(False).requires_grad_(False)
        self.optim_cfg, self.grpo, self.temperature = optim, grpo, temperature
        self._total_steps = total_steps
        self.build_optimizer()

    def build_optimizer(self) -> None:
        """AdamW and its schedule over the model's current parameters. Call it again after
        anything replaces the parameters (FSDP sharding does), or the optimiser steps stale ones."""
        from transformers import get_scheduler

        optim = self.optim_cfg
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.adam_epsilon,
            weight_decay=optim.weight_decay,
        )
        self.scheduler = get_scheduler(
            optim.schedule,
            self.optimizer,
            num_warmup_steps=optim.warmup_steps,
            num_training_steps=self._total_steps * self.grpo.updates_per_batch,
        )

    def _rows(self, n: int) -> list[slice]:
        mb = self.optim_cfg.micro_batch_size
        return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]

    @torch.no_grad()
    def fill_old_and_ref(self, batch: Batch) -> None:
        """Log-probs of the behaviour policy (before any update) and of the reference."""
        batch.to_(self.device)
        n = batch.input_ids.shape[0]
        if self.grpo.updates_per_batch > 1:
            self.model.train(False)
            batch.old_logp = torch.cat(
                [completion_logprobs(self.model, batch, r, self.temperature) for r in self._rows(n)]
            )
            self.model.train()
        if self.ref is not None:
            batch.ref_logp = torch.cat(
                [completion_logprobs(self.ref, batch, r, self.temperature) for r in self._rows(n)]
            )

    def update(
        self,
        batch: Batch,
        max_completion_length: int,
        *,
        num_sequences: int | None = None,
        num_tokens: float | None = None,
        grad_scale: float = 1.0,
    ) -> dict[str, float]:
        """``updates_per_batch`` optimiser steps over ``batch``, each over all micro-batches.

        Under data parallelism ``batch`` is this rank's share: pass the global sequence and
        token counts, and ``grad_scale`` = world size to undo the gradient averaging of the
        all-reduce, so that the step equals the single-process step on the whole batch.

        An optimiser step whose loss or gradient norm is not finite is skipped: the gradient is
        dropped, the weights and AdamW's moments stay as they were, and ``update_skipped``
        counts it (the schedule still advances, so it stays a function of the step). A NaN
        in one parameter would otherwise spread to every weight through AdamW. Sampler
        log-probs that are not finite on trained tokens get no correction and are counted
        (``nonfinite_logprobs``); past ``grpo.max_nonfinite_fraction`` of the trained tokens
        the update stops with :class:`NonFiniteError` before touching the weights."""
        batch.to_(self.device)
        rows_here = batch.input_ids.shape[0]
        n = num_sequences if num_sequences is not None else rows_here
        n_tok = num_tokens if num_tokens is not None else float(batch.completion_mask.sum())
        row_slices = self._rows(rows_here)
        # bnpo (TRL): each micro-batch's token mean over the number of micro-batches in the step,
        # all ranks together (grad_scale is the world size).
        n_micro = len(row_slices) * max(1, round(grad_scale))
        bad_logprobs = 0
        if batch.sampler_logp is not None:
            bad_logprobs = nonfinite(batch.sampler_logp, batch.completion_mask)
            trained = float(batch.completion_mask.sum()) or 1.0
            if bad_logprobs / trained > self.grpo.max_nonfinite_fraction:
                raise NonFiniteError(
                    f"{bad_logprobs} of {int(trained)} trained tokens have a NaN or infinite "
                    f"sampler log-prob, above grpo.max_nonfinite_fraction "
                    f"({self.grpo.max_nonfinite_fraction}); the engine's log-probs are broken"
                )
        stats: list[tuple[float, LossStats]] = []
        mismatch: list[tuple[float, Mismatch]] = []
        grad_norms = []
        skipped = 0
        for epoch in range(self.grpo.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for rows in row_slices:
                logp = completion_logprobs(self.model, batch, rows, self.temperature)
                old = batch.old_logp[rows] if batch.old_logp is not None else logp.detach()
                ref = batch.ref_logp[rows] if batch.ref_logp is not None else None
                mask = batch.completion_mask[rows]
                weights = None
                if batch.sampler_logp is not None:
                    sampled = batch.sampler_logp[rows]
                    weights = importance_weights(
                        old, sampled, self.grpo.is_correction, self.grpo.is_cap, mask=mask
                    )
                    if epoch == 0:
                        mismatch.append(
                            (
                                float(mask.sum()),
                                sampler_mismatch(old, sampled, mask, self.grpo.is_cap),
                            )
                        )
                loss, st = policy_loss(
                    logp,
                    old,
                    batch.advantages[rows],
                    mask,
                    loss_type=self.grpo.loss_type,
                    epsilon_low=self.grpo.epsilon_low,
                    epsilon_high=self.grpo.epsilon_high,
                    beta=self.grpo.beta,
                    ref_logp=ref,
                    num_sequences=n,
                    num_tokens=n_tok,
                    max_completion_length=max_completion_length,
                    is_weights=weights,
                    importance_sampling_level=self.grpo.importance_sampling_level,
                    use_bias_correction_kl=self.grpo.use_bias_correction_kl,
                    num_micro_batches=n_micro,
                )
                # Backward even on a non-finite loss: under data parallelism the NaN gradient
                # reaches every rank's norm, so all ranks skip the same step.
                torch.autograd.backward(loss * grad_scale if grad_scale != 1.0 else loss)
                total += float(loss.detach())
                stats.append((float(mask.sum()), st))
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
            grad_norms.append(float(full() if callable(full) else norm))
            if math.isfinite(total) and math.isfinite(grad_norms[-1]):
                self.optimizer.step()
                self.scheduler.step()
            else:
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # stepping the schedule alone is intended here
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                    self.scheduler.step()
        weight = sum(w for w, _ in stats) or 1.0
        out = {
            "loss": total,
            "grad_norm": grad_norms[-1],
            "lr": float(self.scheduler.get_last_lr()[0]),
            "kl": sum(w * s.kl for w, s in stats) / weight,
            "clip_fraction": sum(w * s.clip_fraction for w, s in stats) / weight,
            "ratio_max": max((s.ratio_max for _, s in stats), default=1.0),
            "grad_finite": float(math.isfinite(grad_norms[-1])),
            "update_skipped": float(skipped),
            "nonfinite_logprobs": float(bad_logprobs),
        }
        if mismatch:
            total_tokens = sum(w for w, _ in mismatch) or 1.0
            out["mismatch/kl"] = sum(w * m.kl for w, m in mismatch) / total_tokens
            out["mismatch/ratio_max"] = max(m.ratio_max for _, m in mismatch)
            out["mismatch/ratio_min"] = min(m.ratio_min for _, m in mismatch)
            off = sum(w * m.off_fraction for w, m in mismatch)
            out["mismatch/off_fraction"] = off / total_tokens
        return out

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)

    def engine_state(self) -> dict[str, torch.Tensor]:
        """The weights a rollout engine loads after an update (tied copies dropped)."""
        from r1_train.rollout import checkpoint_tensors

        return checkpoint_tensors(self.model)

    def trainer_state(self) -> dict[str, Any]:
        """Optimiser (whole, keyed by parameter name), schedule and RNG, for a checkpoint.

        A collective under FSDP2: every rank must call it; rank 0 gets the whole state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # cpu_offload: host tensors (a checkpoint must not need a GPU to read); under FSDP only
        # rank 0 receives them, the one that writes
        optim = get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return {
            "optimizer": optim,
            "optimizer_keys": "name",
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`trainer_state`, sharded or not; also reads the older format
        whose optimiser state is keyed by parameter position (one process only)."""
        if state.get("optimizer_keys") == "name":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
