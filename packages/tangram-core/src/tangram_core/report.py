"""Read a run (JSONL, one finished action per line) and report ACT and utilisation.

Runs come from the simulator (``tangram-core simulate``) or from a live orchestrator. Each line is
a :class:`RunRecord`. The table needs nothing beyond the standard library; the plots need
matplotlib (``pip install 'tangram-core[report]'``), imported only when asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class RunRecord(BaseModel):
    """One finished action of a run."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: str
    submit: float
    start: float | None = None
    end: float
    status: str = "ok"
    units: float = Field(1.0, ge=0, description="Average units held while running.")


def load_run(path: Path) -> list[RunRecord]:
    """Read a run file; a bad line fails with its line number."""
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append(RunRecord.model_validate_json(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid run record: {exc}") from exc
    if not records:
        raise ValueError(f"{path}: no actions in this run file")
    return records


def _quantile(xs: Sequence[float], q: float) -> float:
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def act_table(records: Iterable[RunRecord]) -> list[dict[str, float | str]]:
    """Per kind (and ``all``): count, mean/p50/p90/p99 ACT and mean queue wait, in seconds."""
    by_kind: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
        by_kind["all"].append(r)
    rows: list[dict[str, float | str]] = []
    for kind in sorted(by_kind, key=lambda k: (k == "all", k)):
        rs = by_kind[kind]
        acts = sorted(r.end - r.submit for r in rs)
        waits = [(r.start if r.start is not None else r.end) - r.submit for r in rs]
        rows.append(
            {
                "kind": kind,
                "n": len(rs),
                "mean": sum(acts) / len(acts),
                "p50": _quantile(acts, 0.5),
                "p90": _quantile(acts, 0.9),
                "p99": _quantile(acts, 0.99),
                "wait": sum(waits) / len(waits),
                "failed": sum(r.status != "ok" for r in rs),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, float | str]]) -> str:
    head = (
        f"{'kind':<24} {'n':>8} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'wait':>9} "
        f"{'fail':>5}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['kind']!s:<24} {row['n']:>8} {row['mean']:>8.3f}s {row['p50']:>8.3f}s "
            f"{row['p90']:>8.3f}s {row['p99']:>8.3f}s {row['wait']:>8.3f}s {row['failed']:>5}"
        )
    return "\n".join(lines)


def running_over_time(
    records: Sequence[RunRecord], bins: int = 200
) -> tuple[list[float], dict[str, list[float]]]:
    """Units in use per kind, averaged over ``bins`` equal time slices (the utilisation plot)."""
    t0 = min(r.submit for r in records)
    t1 = max(r.end for r in records)
    width = max((t1 - t0) / bins, 1e-9)
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * bins)
    for r in records:
        if r.start is None:
            continue
        lo, hi = r.start - t0, r.end - t0
        first, last = int(lo // width), min(int(hi // width), bins - 1)
        for b in range(first, last + 1):
            overlap = min(hi, (b + 1) * width) - max(lo, b * width)
            if overlap > 0:
                series[r.kind][b] += r.units * overlap / width
    return [t0 + (b + 0.5) * width for b in range(bins)], dict(series)


def plot(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Draw ``act_cdf.png`` (ACT distribution per kind) and ``utilisation.png`` into out_dir."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "plots need matplotlib: pip install 'tangram-core[report]' (or use --no-plots)"
        ) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(max(r.end - r.submit, 1e-6))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, acts in sorted(by_kind.items()):
        xs = sorted(acts)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{kind} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("action completion time (s)")
    ax.set_ylabel("fraction of actions")
    ax.set_title("ACT distribution per kind")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    cdf = out_dir / "act_cdf.png"
    fig.tight_layout()
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    times, series = running_over_time(records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted(series)
    ax.stackplot(times, *[series[k] for k in kinds], labels=kinds)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("units in use")
    ax.set_title("Resource use over time")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    util = out_dir / "utilisation.png"
    fig.tight_layout()
    fig.savefig(util, dpi=110)
    plt.close(fig)
    return [cdf, util]
