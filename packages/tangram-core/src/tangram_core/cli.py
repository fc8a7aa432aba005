"""``tangram-core``: simulate a recorded trace and report a run.

    tangram-core simulate TRACE.jsonl --cpu 64 --gpu 8 --scheduler elastic --out RUN.jsonl
    tangram-core report RUN.jsonl --out plots/

Errors a user can cause (a missing file, a bad line, an action that cannot fit) exit with
status 2 and one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _simulate(args: argparse.Namespace) -> int:
    from tangram_core.baselines import isolated_per_kind
    from tangram_core.elastic_scheduler import ElasticScheduler
    from tangram_core.scheduler import Scheduler
    from tangram_core.sim import Simulator, load_trace, summarize
    from tangram_core.sim.workloads import dump_result

    trace = load_trace(args.trace)
    capacity = {"cpu": float(args.cpu), "gpu": float(args.gpu)}
    sched: Scheduler
    if args.scheduler == "elastic":
        sched = ElasticScheduler(capacity)
    else:
        sched = isolated_per_kind(_split_per_kind(trace, capacity))
    result = Simulator(sched, name=args.scheduler).run_trace(trace)
    dump_result(result, args.out)
    s = summarize(result.acts())
    print(
        f"{result.n_actions} actions, makespan {result.makespan:.1f}s, mean ACT {s['mean']:.3f}s,"
        f" p99 {s['p99']:.3f}s, simulated in {result.wall_seconds:.1f}s -> {args.out}"
    )
    return 0


def _split_per_kind(
    trace: list[tuple[float, Any]], capacity: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Split each resource evenly among the kinds that use it (the isolated baseline's pools)."""
    need: dict[str, dict[str, float]] = {}
    for _, action in trace:
        spec = action.spec
        kind_need = need.setdefault(spec.kind, {})
        for r, d in spec.demand:
            kind_need[r] = max(kind_need.get(r, 0.0), d * spec.min_units)
    pools: dict[str, dict[str, float]] = {k: {} for k in need}
    for r, cap in capacity.items():
        users = sorted(k for k in need if r in need[k])
        for k in users:
            pools[k][r] = cap / len(users)
            if pools[k][r] < need[k][r]:
                raise ValueError(
                    f"--scheduler isolated splits {r}={cap:g} over {len(users)} kinds "
                    f"({cap / len(users):g} each), less than {k} needs ({need[k][r]:g}); "
                    f"raise --{r} to at least {need[k][r] * len(users):g}"
                )
    return pools


def _report(args: argparse.Namespace) -> int:
    from tangram_core.report import act_table, format_table, load_run, plot

    records = load_run(args.run)
    print(format_table(act_table(records)))
    if not args.no_plots:
        for path in plot(records, args.out):
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tangram-core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a recorded trace (JSONL) through a scheduler")
    sim.add_argument("trace", type=Path)
    sim.add_argument("--cpu", type=float, default=64.0, help="CPU units in the shared pool")
    sim.add_argument("--gpu", type=float, default=8.0, help="GPU units in the shared pool")
    sim.add_argument("--scheduler", choices=["elastic", "isolated"], default="elastic")
    sim.add_argument("--out", type=Path, default=Path("run.jsonl"))
    sim.set_defaults(fn=_simulate)
    rep = sub.add_parser("report", help="ACT table and PNG plots for a run (JSONL)")
    rep.add_argument("run", type=Path)
    rep.add_argument("--out", type=Path, default=Path("tangram-report"))
    rep.add_argument("--no-plots", action="store_true", help="print the table only")
    rep.set_defaults(fn=_report)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"tangram-core {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
