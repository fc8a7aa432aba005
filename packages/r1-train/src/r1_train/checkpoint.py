"""Checkpoints that a resumed run continues from bit for bit.

A checkpoint folder is a loadable HF checkpoint (safetensors weights, config, tokenizer: point
vLLM or transformers at it) plus ``trainer_state.pt`` (optimiser, schedule, torch RNG) and
``state.json`` (the next step). Task order and sampling seeds are functions of (seed, step),
so nothing else is needed to replay the data stream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, policy: Any, tokenizer: Any) -> Path:
    """Write the state after ``step`` steps; atomically visible (written, then renamed)."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    tmp.mkdir(parents=True, exist_ok=True)
    policy.save(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": policy.optimizer.state_dict(),
            "scheduler": policy.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"next_step": step}))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("checkpoint-*")
        if (m := _NAME.match(p.name))
    ]
    return max(found)[1] if found else None


def next_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "state.json").read_text())["next_step"])


def restore_trainer_state(checkpoint: Path, policy: Any) -> None:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    policy.optimizer.load_state_dict(state["optimizer"])
    policy.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
