"""Step metrics: one JSON line per step, TensorBoard scalars, and PNG curves (``r1-train plot``).

JSONL is the source of truth (greppable, diffable, read back by ``plot`` and by tests);
TensorBoard gets the same numbers for those who live in it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
STEP_LOGS = (METRICS_FILE, SAMPLES_FILE)


def trim_step_logs(run_dir: Path, next_step: int) -> dict[str, int]:
    """Drop every row of the run's step logs whose ``step`` is ``>= next_step``.

    Why: a step's metrics and samples are appended when the step ends, before its checkpoint
    is written. A run that dies between the two (or while writing the checkpoint) resumes from
    the previous checkpoint and logs those steps again; without this, ``metrics.jsonl`` read
    ``[0, 1, 2, 2, 3]``. Called at the start of every run with the step it starts from, so each
    log holds each step exactly once. A torn last line (a crash mid-write) is dropped too.
    Returns the rows removed per file. The file is replaced atomically (written, then renamed).
    """
    removed: dict[str, int] = {}
    for name in STEP_LOGS:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                dropped += 1  # a line cut short by the crash
                continue
            if isinstance(step, int) and step >= next_step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = path.with_name(f".{name}.trim")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(path)
        removed[name] = dropped
    return removed


class MetricsWriter:
    """Appends one JSON line per step to ``metrics.jsonl`` (and TensorBoard scalars)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; JSONL always works
                pass
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, row: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} an r1-train run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTS = {
    "reward": ["reward_mean"],
    "accuracy": ["accuracy"],
    "response_length": ["response_tokens_mean"],
    "kl_and_clip": ["kl", "clip_fraction"],
    "step_time": ["time/generation", "time/tools", "time/rewards", "time/update", "time/sync"],
}


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw each curve group of :data:`PLOTS` as a PNG; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(name.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
