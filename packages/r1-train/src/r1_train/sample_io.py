"""The files ``r1-train sample`` writes, and how ``--resume`` reads them back.

Two JSONL files grow together, one prompt at a time:

* ``sample.out``: the SFT set, one ``{"messages": [...]}`` per accepted answer, exactly what
  ``r1-train sft`` reads (its loader refuses unknown keys, so the rows carry no ids);
* ``<stem>.counts.jsonl`` beside it: one :class:`PromptCounts` per finished prompt, which also
  records how many SFT rows the output holds once that prompt's rows are in (``rows``).

A prompt's SFT rows are appended (one ``write``, then ``fsync``) before its counts line, and a
prompt counts as done only once its counts line is whole. A run killed between the two leaves
SFT rows that no counts line covers; ``--resume`` cuts the output back to the ``rows`` of the
last whole counts line, so those rows are written again once, never twice. A line is whole when
it ends in a newline: each line goes out in one ``write`` with its newline last, so a torn
write is the last line and lacks it. A whole line that is not valid JSON is not a torn write
but a damaged file, and is refused with the file and the row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1_train.config import ConfigError


class SampleDataError(ValueError):
    """An output file that cannot be resumed from: names the file and the row."""


@dataclass(frozen=True)
class PromptCounts:
    """What happened to one prompt's ``n`` answers. ``infra_failed`` answers are those whose
    reward action failed for infrastructure reasons: not judged, so neither accepted nor
    rejected. ``written`` <= ``accepted``: duplicates and answers past
    ``sample.max_per_prompt`` are accepted but not written."""

    index: int  # the prompt's position in the task list
    task_id: str
    n: int
    accepted: int
    rejected: int
    infra_failed: int
    written: int
    rows: int  # SFT rows in sample.out once this prompt's are in: where a resume cuts it
    truncated: int = 0  # answers cut at rollout.max_new_tokens, whatever their verdict
    infra_error: str | None = None  # the first infrastructure failure's message

    def __post_init__(self) -> None:
        judged = self.accepted + self.rejected + self.infra_failed
        if judged != self.n or not 0 <= self.written <= self.accepted:
            raise ValueError(
                f"counts of task {self.task_id!r} do not add up: accepted {self.accepted} + "
                f"rejected {self.rejected} + infra_failed {self.infra_failed} must be n "
                f"({self.n}), and written ({self.written}) at most accepted"
            )


@dataclass
class Progress:
    """What the outputs already hold: the finished prompts by index, and the SFT rows."""

    done: dict[int, PromptCounts] = field(default_factory=dict)
    rows: int = 0
    torn_counts: bool = False  # a torn last counts line was dropped
    dropped_rows: int = 0  # SFT rows of prompts in flight when the last run stopped


def counts_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.counts.jsonl")


def summary_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.summary.json")


def _whole_lines(path: Path) -> tuple[list[bytes], list[int], int]:
    """(each whole line, the byte offset after each, the file's size)."""
    data = path.read_bytes() if path.exists() else b""
    lines, ends, start = [], [], 0
    while (nl := data.find(b"\n", start)) >= 0:
        lines.append(data[start:nl])
        ends.append(nl + 1)
        start = nl + 1
    return lines, ends, len(data)


def _cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def recover(out: Path) -> Progress:
    """Read what a previous run left; drop a torn counts line and the SFT rows that no whole
    counts line covers (both files are cut in place)."""
    counts = counts_path(out)
    lines, ends, size = _whole_lines(counts)
    progress = Progress()
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = PromptCounts(**json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise SampleDataError(
                f"{counts}: row {row}: not a counts row ({exc}); the file is damaged: move it "
                "and the output away, or choose another sample.out"
            ) from None
        progress.done[item.index] = item
        progress.rows = item.rows
    whole = ends[-1] if ends else 0
    if whole < size:
        _cut(counts, whole)
        progress.torn_counts = True
    rows, row_ends, out_size = _whole_lines(out)
    if len(rows) < progress.rows:
        raise SampleDataError(
            f"{out} holds {len(rows)} whole rows but {counts} says {progress.rows} were written: "
            "the two files do not belong together (was one edited or replaced?)"
        )
    keep = row_ends[progress.rows - 1] if progress.rows else 0
    if keep < out_size:
        torn_row = (row_ends[-1] if row_ends else 0) < out_size
        progress.dropped_rows = len(rows) - progress.rows + int(torn_row)
        _cut(out, keep)
    return progress


def prepare(out: Path, *, resume: bool) -> Progress:
    """The progress to start from. Without ``resume`` an output that already holds samples is
    refused: appending to it would mix two runs, overwriting it would lose one."""
    counts = counts_path(out)
    if out == counts:
        raise ConfigError(f"sample.out {str(out)!r} is the name of its own counts file")
    if not resume:
        held = [p for p in (out, counts) if p.exists() and p.stat().st_size > 0]
        if held:
            raise ConfigError(
                f"sample.out: {held[0]} already holds samples; pass --resume to continue that "
                "run, or choose another sample.out"
            )
        return Progress()
    return recover(out)


def check_resumable(progress: Progress, task_ids: Sequence[str], n: int, out: Path) -> None:
    """A resume must sample the same tasks with the same ``n`` as the run it continues."""
    for item in progress.done.values():
        if item.index < len(task_ids) and task_ids[item.index] != item.task_id:
            raise ConfigError(
                f"--resume: {counts_path(out)} has task {item.task_id!r} at position "
                f"{item.index}, but this config puts {task_ids[item.index]!r} there: use the "
                "task.* settings of the run being resumed, or another sample.out"
            )
        if item.n != n:
            raise ConfigError(
                f"--resume: {counts_path(out)} was sampled with sample.n {item.n}, this config "
                f"asks for {n}: use the same sample.n, or another sample.out"
            )


class Writer:
    """Appends a finished prompt: its SFT rows, then its counts line, each in one ``write``
    followed by ``fsync``, so that a kill loses at most the prompts in flight."""

    def __init__(self, out: Path, progress: Progress) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.rows = progress.rows
        self._out = open(out, "ab")  # noqa: SIM115  closed by close()
        self._counts = open(counts_path(out), "ab")  # noqa: SIM115

    def add(
        self,
        index: int,
        task_id: str,
        verdicts: Sequence[str],
        conversations: Sequence[dict[str, Any]],
        *,
        truncated: int = 0,
        infra_error: str | None = None,
    ) -> PromptCounts:
        """Write one prompt; ``verdicts`` holds one of ``accepted``, ``rejected``,
        ``infra_failed`` per answer, ``conversations`` the SFT rows kept."""
        item = PromptCounts(
            index=index,
            task_id=task_id,
            n=len(verdicts),
            accepted=verdicts.count("accepted"),
            rejected=verdicts.count("rejected"),
            infra_failed=verdicts.count("infra_failed"),
            written=len(conversations),
            rows=self.rows + len(conversations),
            truncated=truncated,
            infra_error=infra_error,
        )
        if conversations:
            _append(self._out, "".join(json.dumps(c) + "\n" for c in conversations))
        _append(self._counts, json.dumps(asdict(item)) + "\n")
        self.rows = item.rows
        return item

    def close(self) -> None:
        self._out.close()
        self._counts.close()


def _append(f: Any, text: str) -> None:
    f.write(text.encode())
    f.flush()
    os.fsync(f.fileno())


def summarise(done: Iterable[PromptCounts]) -> dict[str, Any]:
    """Totals over the finished prompts (this run's and the ones it resumed)."""
    items = list(done)
    keys = ("accepted", "rejected", "written", "truncated")
    total = {k: sum(getattr(i, k) for i in items) for k in keys}
    infra = sum(i.infra_failed for i in items)
    samples = sum(i.n for i in items)
    judged = samples - infra
    return {
        "prompts": len(items),
        "samples": samples,
        **total,
        "infra_failed": infra,
        "acceptance_rate": total["accepted"] / judged if judged else 0.0,
        "prompts_with_accepted": sum(1 for i in items if i.accepted),
    }
