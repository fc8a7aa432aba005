"""One trainer rank of a cluster run, as a Ray actor: the policy (FSDP2 over the ranks when
there are several), its optimiser, and the calls the driver makes on it.

The ranks form one ``torch.distributed`` group: rank 0 picks a free port on its own node and
the driver hands that address to every rank (:meth:`TrainerRank.rendezvous`), so nothing is
hard-coded and the ranks may sit on any nodes. Every call that gathers (the weights for the
engines, a checkpoint) is a collective: the driver makes it on all ranks at once, and only
rank 0 returns the data.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from r1_train.config import ModelConfig, TrainConfig
from r1_train.remote_trace import RANK, remote_span, where

SPAN_RANK_UPDATE = "tangram.train.update.rank"
SPAN_RANK_GATHER = "tangram.train.weight_gather.rank"


class TrainerRank:
    """Created by the driver with ``ray.remote(TrainerRank).options(...)`` in the trainer
    role's placement group; not meant to be built by hand."""

    def __init__(self, rank: int, world: int, cfg: TrainConfig) -> None:
        from tangram_core.telemetry import configure_telemetry

        self.rank, self.world, self.cfg = rank, world, cfg
        self.policy: Any = None
        configure_telemetry(
            service_name="r1-train", resource_attributes={"tangram.role": "trainer", RANK: rank}
        )

    def where(self) -> dict[str, Any]:
        return {"rank": self.rank, **where()}

    def rendezvous(self) -> str:
        """A ``tcp://ip:port`` on this node for the process group (called on rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, model_path: str, init_method: str | None, resume: str | None) -> str:
        """Join the group, load the policy, shard it, restore a checkpoint; returns the dtype
        the engines must use ("float32" or "bfloat16")."""
        import torch

        from r1_train.checkpoint import restore_trainer_state
        from r1_train.distributed import shard_policy
        from r1_train.policy import Policy

        if self.world > 1:
            import torch.distributed as dist

            backend = self.cfg.cluster.trainer.backend if self.cfg.cluster else "auto"
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=self.rank,
                world_size=self.world,
                timeout=timedelta(minutes=10),
            )
        cfg = self.cfg
        gpus = cfg.cluster.trainer.num_gpus if cfg.cluster else 0.0
        self.policy = Policy(
            ModelConfig(path=Path(model_path), dtype=cfg.model.dtype),
            cfg.optim,
            cfg.grpo,
            total_steps=cfg.run.steps,
            temperature=cfg.rollout.temperature,
            reference=cfg.model,
            # a rank given a GPU computes on it (Ray set CUDA_VISIBLE_DEVICES to that GPU)
            device="cuda" if gpus > 0 and torch.cuda.is_available() else "cpu",
        )
        if self.world > 1:
            shard_policy(self.policy)
        if resume is not None:
            restore_trainer_state(Path(resume), self.policy)
        return "bfloat16" if self.policy.dtype == torch.bfloat16 else "float32"

    def update(
        self,
        share: Any,
        *,
        num_sequences: int,
        num_tokens: float,
        max_completion_length: int,
        carrier: dict[str, str],
    ) -> dict[str, Any]:
        """The GRPO update on this rank's rows, with the whole batch's counts (so the step
        equals the one-process step); returns its statistics and its span's ids."""
        with remote_span(SPAN_RANK_UPDATE, carrier, {RANK: self.rank}) as span:
            self.policy.fill_old_and_ref(share)
            stats = self.policy.update(
                share,
                max_completion_length,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
                grad_scale=float(self.world),
            )
        stats["_tokens"] = float(share.completion_mask.sum())
        stats["_span"] = span
        return dict(stats)

    def engine_state(self, carrier: dict[str, str]) -> tuple[bytes | None, dict[str, Any]]:
        """The whole weights for the engines, as one safetensors file's bytes (rank 0; None
        elsewhere), and the span's ids. Serialised once here: each engine writes the bytes
        where its vLLM reads them, with no unpickling and re-serialising per engine."""
        from safetensors.torch import save

        from r1_train.rollout import weight_fingerprint

        with remote_span(SPAN_RANK_GATHER, carrier, {RANK: self.rank}) as span:
            state = _on_cpu(self.policy.engine_state())
            blob = save(state) if self.rank == 0 else None
        # what the engines must report after loading it (checked by the driver)
        span["fingerprint"] = weight_fingerprint(state)
        return blob, span

    def checkpoint(self) -> dict[str, Any] | None:
        """Weights and trainer state, whole (rank 0; None elsewhere)."""
        weights = _on_cpu(self.policy.engine_state())
        trainer = self.policy.trainer_state()
        return {"weights": weights, "trainer_state": trainer} if self.rank == 0 else None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _on_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """Host copies: what goes into Ray's object store must not be a GPU tensor, which would
    need a GPU (the same one) wherever it is read."""
    return {k: v.detach().cpu() for k, v in state.items()}
