"""Data-parallel training with torch FSDP2 (``fully_shard``) under ``torchrun``.

The multi-GPU path uses an existing engine, not a home-made one: each decoder layer and then the
whole model are wrapped with FSDP2, parameters and optimiser state are sharded over the ranks,
and each rank trains on its share of the batch. GRPO's loss takes the *global* sequence and
token counts (see :mod:`r1_train.grpo`), and the gradient is scaled by the world size to undo
the all-reduce's averaging, so a data-parallel step equals the single-process step on the whole
batch (the test checks this on CPU with gloo, two processes).

    torchrun --nproc_per_node 8 my_train.py      # NCCL on GPUs; gloo on CPU

A rank ends with :func:`close_data_parallel`, so that no rank leaves while another still works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int

    def share(self, n: int) -> slice:
        """This rank's contiguous rows of an ``n``-row batch (the first ranks take the rest)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def init_data_parallel() -> Rank:
    """Join the ``torchrun`` process group (NCCL with CUDA, gloo otherwise)."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise RuntimeError("no torchrun environment (RANK, WORLD_SIZE): launch with torchrun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size())


def close_data_parallel() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group``.

    Why: a rank that reaches interpreter exit with the group still open can abort in the
    backend's threads (gloo: "terminate called without an active exception", SIGABRT), and
    torchrun then kills the ranks still working, say rank 0 writing the checkpoint. Call it
    once at the end of every rank's work."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_policy(policy: Any) -> None:
    """FSDP2 over the policy: each decoder layer, then the root; rebuilds the optimiser.

    The frozen reference stays replicated: it only runs forward passes without gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(
        "cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),)
    )
    layers = getattr(getattr(policy.model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(policy.model).__name__} has no model.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy.model, mesh=mesh)
    policy.build_optimizer()


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (on every rank), under its checkpoint name: what the
    weight sync to vLLM and the checkpoint writer need."""
    out = {}
    for name, tensor in model.state_dict().items():
        full = getattr(tensor, "full_tensor", None)
        out[name] = (full() if callable(full) else tensor).detach().contiguous()
    return out
