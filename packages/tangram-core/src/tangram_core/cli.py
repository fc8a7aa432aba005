"""``tangram-core``: simulate a recorded trace and report a run.

    tangram-core simulate TRACE.jsonl --cpu 64 --gpu 8 --scheduler elastic --out RUN.jsonl
    tangram-core simulate TRACE.jsonl --cpu 64 --gpu 8 --scheduler static --sandbox-cores 2
    tangram-core report RUN.jsonl --out plots/
    tangram-core trace-from-otel SPANS.json --pool sandbox=cpu:1 --out TRACE.jsonl \
        --replay cpu=64,gpu=8

Errors a user can cause (a missing file, a bad line, an action that cannot fit, a bad
``OTEL_*`` value) exit with status 2 and one line naming the problem, never a traceback.
Telemetry follows the ``OTEL_*`` variables: each command is a ``tangram.cli.<command>`` span
(``OTEL_TRACES_EXPORTER=console`` prints it, with the simulation's figures as attributes).
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
    from tangram_core.sim.bounds import capacity_bound, trace_jobs
    from tangram_core.sim.workloads import dump_result

    trace = load_trace(args.trace)
    capacity = {"cpu": float(args.cpu), "gpu": float(args.gpu)}
    sched: Scheduler
    if args.scheduler == "elastic":
        sched = ElasticScheduler(capacity)
    elif args.scheduler == "static":
        sched = _static(trace, capacity, args.sandbox_cores)
    else:
        sched = isolated_per_kind(_split_per_kind(trace, capacity))
    result = Simulator(sched, name=args.scheduler).run_trace(trace)
    dump_result(result, args.out)
    s = summarize(result.acts())
    bound = capacity_bound(trace_jobs(trace), capacity)
    from opentelemetry import trace as otel_trace

    span = otel_trace.get_current_span()
    span.set_attribute("tangram.sim.scheduler", args.scheduler)
    span.set_attribute("tangram.sim.actions", result.n_actions)
    span.set_attribute("tangram.sim.mean_act_s", s["mean"])
    span.set_attribute("tangram.sim.makespan_s", result.makespan)
    span.set_attribute("tangram.sim.act_over_capacity_bound", s["mean"] / bound.mean)
    print(
        f"{result.n_actions} actions, makespan {result.makespan:.1f}s, mean ACT {s['mean']:.3f}s,"
        f" p99 {s['p99']:.3f}s, simulated in {result.wall_seconds:.1f}s -> {args.out}"
    )
    print(
        f"lower bounds of mean ACT: no queueing {bound.no_queueing_mean:.3f}s, capacity "
        f"{bound.mean:.3f}s ({bound.binding}); act_over_capacity_bound "
        f"{s['mean'] / bound.mean:.3f}"
    )
    return 0


def _static(
    trace: list[tuple[float, Any]], capacity: dict[str, float], sandbox_cores: float
) -> Any:
    """The static lease baseline on the same totals: ``cpu / sandbox_cores`` sandboxes that
    trajectories lease for their whole life, and each kind that needs another resource (a
    reward model on GPUs) on its own fixed fleet, that resource split evenly among them."""
    from tangram_core.baselines import StaticLeaseScheduler

    n_sandboxes = int(capacity.get("cpu", 0.0) // sandbox_cores)
    if n_sandboxes < 1:
        raise ValueError(
            f"--scheduler static needs at least one sandbox: --cpu ({capacity.get('cpu', 0):g}) "
            f"must be >= --sandbox-cores ({sandbox_cores:g})"
        )
    fleet_kinds = {
        action.spec.kind for _, action in trace if any(r != "cpu" for r, _ in action.spec.demand)
    }
    fleet_trace = [item for item in trace if item[1].spec.kind in fleet_kinds]
    others = {r: v for r, v in capacity.items() if r != "cpu"}
    fleets = _split_per_kind(fleet_trace, others, "static") if fleet_trace else {}
    return StaticLeaseScheduler(n_sandboxes, {"cpu": sandbox_cores}, fleets)


def _split_per_kind(
    trace: list[tuple[float, Any]], capacity: dict[str, float], scheduler: str = "isolated"
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
                    f"--scheduler {scheduler} splits {r}={cap:g} over {len(users)} kinds "
                    f"({cap / len(users):g} each), less than {k} needs ({need[k][r]:g}); "
                    f"raise --{r} to at least {need[k][r] * len(users):g}"
                )
    return pools


def _amounts(text: str, sep: str) -> dict[str, float]:
    """``"cpu=2,gpu=1"`` (sep ``=``) or ``"cpu:1"`` (sep ``:``) as a dict; errors quote it."""
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition(sep)
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{text!r}: expected name{sep}number[,name{sep}number...]") from None
    return out


def _trace_from_otel(args: argparse.Namespace) -> int:
    from tangram_core.otel_trace import load_otlp_json, replay_act_error, trace_from_spans
    from tangram_core.sim.workloads import save_trace

    pools = {}
    for spec in args.pool:
        name, _, demand = spec.partition("=")
        pools[name] = _amounts(demand, ":")
    records, acts = trace_from_spans(load_otlp_json(args.spans), pools)
    save_trace(records, args.out)
    real = sum(acts) / len(acts)
    print(f"{len(records)} actions, real mean ACT {real:.3f}s -> {args.out}")
    if args.replay:
        capacity = _amounts(args.replay, "=")
        replay, error = replay_act_error(records, acts, capacity)
        print(f"replayed at {capacity}: mean ACT {replay:.3f}s, replay_act_error {error:.3f}")
    return 0


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
    sim.add_argument("--scheduler", choices=["elastic", "isolated", "static"], default="elastic")
    sim.add_argument(
        "--sandbox-cores",
        type=float,
        default=1.0,
        help="static only: cores per leased sandbox (the pool holds cpu / sandbox-cores of them)",
    )
    sim.add_argument("--out", type=Path, default=Path("run.jsonl"))
    sim.set_defaults(fn=_simulate)
    rep = sub.add_parser("report", help="ACT table and PNG plots for a run (JSONL)")
    rep.add_argument("run", type=Path)
    rep.add_argument("--out", type=Path, default=Path("tangram-report"))
    rep.add_argument("--no-plots", action="store_true", help="print the table only")
    rep.set_defaults(fn=_report)
    tfo = sub.add_parser(
        "trace-from-otel", help="a simulator trace (JSONL) from a run's exported spans (OTLP JSON)"
    )
    tfo.add_argument("spans", type=Path)
    tfo.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME=RES:AMOUNT[,RES:AMOUNT]",
        help="per-unit demand of a pool's actions (default: one unit of a resource named "
        "after the pool)",
    )
    tfo.add_argument("--out", type=Path, default=Path("trace.jsonl"))
    tfo.add_argument(
        "--replay", metavar="RES=N[,RES=N]", help="also replay at this capacity and compare"
    )
    tfo.set_defaults(fn=_trace_from_otel)
    args = parser.parse_args(argv)
    from tangram_core.telemetry import configure_telemetry, get_tracer

    telemetry = None
    try:
        telemetry = configure_telemetry(service_name="tangram-core")
        name = f"tangram.cli.{args.command.replace('-', '_')}"
        with get_tracer().start_as_current_span(name):
            return int(args.fn(args))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"tangram-core {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if telemetry is not None:
            telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
