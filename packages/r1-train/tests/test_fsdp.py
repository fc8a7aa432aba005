"""The multi-GPU path, as far as this machine allows: FSDP2 over two CPU processes (gloo) under
torchrun takes the same GRPO step as one process on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1_train.config import GRPOConfig, ModelConfig, OptimConfig
from r1_train.distributed import Rank
from r1_train.policy import Batch, Policy, make_batch

pytestmark = pytest.mark.slow

WORKER = """
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {here!r})
from test_fsdp import fixed_batch, make_policy, smooth_adam
from r1_train.policy import Batch
from r1_train.distributed import (
    close_data_parallel, full_state_dict, init_data_parallel, shard_policy,
)

rank = init_data_parallel()
policy = make_policy(Path({model!r}))
shard_policy(policy)
smooth_adam(policy)
batch = fixed_batch()
mine = rank.share(batch.input_ids.shape[0])
part = Batch(batch.input_ids[mine], batch.attention_mask[mine], batch.completion_ids[mine],
             batch.completion_mask[mine], batch.prompt_lens[mine], batch.advantages[mine])
stats = policy.update(part, 8, num_sequences=batch.input_ids.shape[0],
                      num_tokens=float(batch.completion_mask.sum()), grad_scale=rank.world)
state = full_state_dict(policy.model)
if rank.rank == 0:
    torch.save(state, {out!r})
    Path({out!r} + ".json").write_text(json.dumps(stats))
close_data_parallel()
"""


def make_policy(model: Path) -> Policy:
    optim = OptimConfig(lr=0.1, micro_batch_size=2, grad_clip=1e9)  # big: see smooth_adam
    return Policy(
        ModelConfig(path=model, dtype="float32"),
        optim,
        GRPOConfig(),
        total_steps=1,
        temperature=1.0,
    )


def smooth_adam(policy: Policy) -> None:
    """Give AdamW an eps of 1 so that its first step is smooth in the gradient.

    With the default eps, the first step is about ``lr * sign(g)``: a gradient that is nearly 0
    takes a sign from float rounding, which differs between a sharded all-reduce and one
    process summing the whole batch, and that rounding then moves a weight by a full ``lr``.
    With eps 1 the step is ``lr * g / (|g| + 1)``, so the comparison checks the gradients."""
    for group in policy.optimizer.param_groups:
        group["eps"] = 1.0


def fixed_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 600, (4 + i % 3,), generator=g).tolist() for i in range(6)]
    comps = [torch.randint(5, 600, (3 + i % 4,), generator=g).tolist() for i in range(6)]
    masks = [[1] * len(c) for c in comps]
    masks[2][0] = 0  # an observation token
    adv = torch.randn(6, generator=g).tolist()
    return make_batch(prompts, comps, masks, adv, pad_id=0)


def test_rank_shares_cover_the_batch_once() -> None:
    rows = [list(range(10))[Rank(r, 3).share(10)] for r in range(3)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_fsdp_step_equals_the_single_process_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "fsdp.pt")
    script = tmp_path / "worker.py"
    here = str(Path(__file__).parent)
    script.write_text(WORKER.format(here=here, model=str(tiny_model_dir), out=out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]

    single = make_policy(tiny_model_dir)
    smooth_adam(single)
    batch = fixed_batch()
    stats = single.update(batch, 8)
    sharded = torch.load(out)
    for name, tensor in single.model.state_dict().items():
        if name in sharded:
            assert torch.allclose(sharded[name], tensor, atol=1e-6, rtol=1e-5), name
    assert json.loads(Path(out + ".json").read_text())["grad_norm"] == pytest.approx(
        stats["grad_norm"], rel=1e-4
    )
