"""Checkpoints that a resumed run continues from bit for bit.

A checkpoint folder is a loadable HF checkpoint (safetensors weights, config, tokenizer: point
vLLM or transformers at it) plus ``trainer_state.pt`` (optimiser, schedule, torch RNG) and
``state.json`` (the next step). Task order and sampling seeds are functions of (seed, step),
so nothing else is needed to replay the data stream.

The optimiser state is stored whole and keyed by parameter name (torch's
``get_optimizer_state_dict(full_state_dict=True)``), not by the position of a parameter in one
process's optimiser: a checkpoint written by one process resumes on a cluster of N trainer
ranks (FSDP2 shards it on load) and the other way round. ``trainer_state.pt`` holds only
tensors and plain values and is read with ``weights_only=True``: a checkpoint folder from
elsewhere cannot run code when it is resumed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written: says where, why, and what was kept.

    Why: torch's zip writer reports a full disk as ``unexpected pos 2237120 vs 2237012``,
    with no path and no ``No space left on device``. The partial folder is removed (it would
    fill the disk further and is not loadable); the previous checkpoint is untouched.
    ``errno`` is the OS error behind it (``errno.ENOSPC``, ...), or None."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


def save_checkpoint(run_dir: Path, step: int, policy: Any, tokenizer: Any) -> Path:
    """Write the state after ``step`` steps; atomically visible (written, then renamed).

    ``policy`` is anything with ``save(folder)`` (the HF weights and config) and
    ``trainer_state()`` (optimiser by name, schedule, RNG): the one-process
    :class:`~r1_train.policy.Policy`, or the cluster's trainer ranks.

    Raises :class:`CheckpointWriteFailed` when any part cannot be written (disk full, file
    size limit, permissions), with the partial ``.tmp-checkpoint-*`` folder removed."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    remove_partial_checkpoints(run_dir)  # a run killed while saving left its own behind
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        policy.save(tmp)
        tokenizer.save_pretrained(tmp)
        # serialised in memory, then written by Python: a failed write then raises an OSError
        # with its errno and path, where torch's zip writer only reports a position mismatch
        buf = io.BytesIO()
        torch.save(policy.trainer_state(), buf)
        with (tmp / "trainer_state.pt").open("wb") as f:
            f.write(buf.getbuffer())
        (tmp / "state.json").write_text(json.dumps({"next_step": step}))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(run_dir, final, exc) from exc
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete ``.tmp-checkpoint-*`` folders (a save that crashed); returns what was removed."""
    found = sorted(Path(run_dir).glob(".tmp-checkpoint-*")) if Path(run_dir).is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _write_failed(run_dir: Path, final: Path, exc: BaseException) -> CheckpointWriteFailed:
    errno_ = next(
        (e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno is not None), None
    )
    if errno_ is None:  # safetensors (Rust) reports "... (os error 28)" in its text only
        found = re.search(r"os error (\d+)", str(exc))
        errno_ = int(found.group(1)) if found else None
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free on its filesystem"
    except OSError:
        free = "free space unknown"
    if errno_ == errno.ENOSPC:
        why = "No space left on device"
    elif errno_ == errno.EFBIG:
        why = "File too large (a file size limit, e.g. ulimit -f)"
    elif errno_ is not None:
        why = os.strerror(errno_)
    else:
        why = f"{type(exc).__name__}: {exc}"
    kept = latest_checkpoint(run_dir)
    keep = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
    return CheckpointWriteFailed(
        f"could not write checkpoint {final}: {why} ({free}; {type(exc).__name__}: {exc}). "
        f"The partial folder was removed; {keep}. Free space (or raise the limit) and resume "
        "with run.resume=true",
        errno_,
    )


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("checkpoint-*")
        if (m := _NAME.match(p.name))
    ]
    return max(found)[1] if found else None


def next_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "state.json").read_text())["next_step"])


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of ``checkpoint``, read without unpickling code."""
    state: dict[str, Any] = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    return state


def restore_trainer_state(checkpoint: Path, policy: Any) -> None:
    """Load the optimiser, schedule and RNG of ``checkpoint`` into ``policy``."""
    policy.load_trainer_state(read_trainer_state(checkpoint))
