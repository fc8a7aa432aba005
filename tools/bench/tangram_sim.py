#!/usr/bin/env python3
"""Simulated reproduction of ARL-Tangram's claims: Tangram vs static and isolated provisioning.

One run measures, on the same workloads and the same scheduler code the runtime uses:

1. **ACT and RL step time at equal resources**, for a grid of static provisioning levels
   (sandbox size, and sandboxes per concurrent trajectory). The headline is the setting most
   favourable to static: one 1-core sandbox per trajectory, so no trajectory ever waits for a
   sandbox. Every other row is printed and stored too, including where we lose.
2. **Resources at equal p50 ACT**: the smallest Tangram pool (CPU and GPU scaled together) whose
   p50 ACT is no worse than static's at the headline provisioning.
3. **Scheduler speed**: decisions per second with 10,000 actions queued.
4. **Cluster scale**: 1,000,000 actions on 10,000 cores and 256 GPUs (open-loop trace).

Writes ``tools/bench/results/tangram_sim.json``. ``--quick`` runs a smaller version (CI smoke).
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import sys
import time
from pathlib import Path

from _machine import machine_info, write_result

from tangram_core.autoscaling import AutoscalingConfig
from tangram_core.baselines import StaticLeaseScheduler, isolated_per_kind
from tangram_core.elastic_scheduler import ElasticScheduler
from tangram_core.scheduler import ActionSpec, Scheduler
from tangram_core.sim import (
    CodeAgentWorkload,
    PoolScaling,
    SimAutoscaling,
    SimResult,
    Simulator,
    code_agent_steps,
    count_actions,
    poisson_actions,
    summarize,
)

RESULTS = Path(__file__).resolve().parent / "results"
GPUS_PER_REWARD_MODEL = 2.0


def run(sched: Scheduler, steps: list, name: str) -> SimResult:
    return Simulator(sched, name=name).run_steps(steps)


def compare(w: CodeAgentWorkload, steps: list, sandbox_cores: float, per_traj: float) -> dict:
    """Static, isolated and Tangram on the same steps, with equal total CPUs and GPUs."""
    n_sandboxes = max(1, round(w.trajectories_per_step * per_traj))
    cpu = n_sandboxes * sandbox_cores
    fleets = {m: {"gpu": GPUS_PER_REWARD_MODEL} for m in w.reward_models}
    gpu = GPUS_PER_REWARD_MODEL * len(fleets)
    runs = {
        "static": run(
            StaticLeaseScheduler(n_sandboxes, {"cpu": sandbox_cores}, fleets), steps, "static"
        ),
        "isolated": run(
            isolated_per_kind(
                {"sandbox.exec": {"cpu": cpu / 2}, "sandbox.run_tests": {"cpu": cpu / 2}, **fleets}
            ),
            steps,
            "isolated",
        ),
        "tangram": run(tangram := ElasticScheduler({"cpu": cpu, "gpu": gpu}), steps, "tangram"),
        # The same scheduler on pools that the runtime's autoscaling policy sizes, up to the
        # same totals: what Tangram pays when it gives idle units back.
        "autoscaled": Simulator(
            ElasticScheduler({"cpu": AUTO_MIN_CPU, "gpu": AUTO_MIN_GPU}),
            name="autoscaled",
            autoscaling=autoscaling(cpu, gpu),
        ).run_steps(steps),
    }
    row: dict = {
        "sandbox_cores": sandbox_cores,
        "sandboxes_per_trajectory": per_traj,
        "cpu": cpu,
        "gpu": gpu,
    }
    for name, r in runs.items():
        act = summarize(r.acts())
        row[name] = {
            "act": act,
            "act_code_mean": summarize(r.acts("sandbox"))["mean"],
            "act_reward_mean": summarize(r.acts("reward"))["mean"],
            "step_mean_s": sum(r.step_durations) / len(r.step_durations),
            "utilisation": r.utilisation(),
        }
    # The estimator learned online during the run; each error is measured before it learned.
    row["tangram"]["estimator"] = {
        k: {"n": a.count, "mape": a.mape, "geo_bias": a.geo_bias}
        for k, a in tangram.estimator.accuracy().items()
    }
    paid = {name: runs[name].resource_seconds() for name in ("static", "autoscaled")}
    row["autoscaled"]["paid_unit_seconds"] = paid["autoscaled"]
    row["static"]["paid_unit_seconds"] = paid["static"]
    row["autoscaled_saving_vs_static"] = {
        "all": 1.0 - sum(paid["autoscaled"].values()) / sum(paid["static"].values()),
        **{r: 1.0 - paid["autoscaled"][r] / paid["static"][r] for r in ("cpu", "gpu")},
    }
    row["autoscaled_act_ratio_vs_static"] = (
        row["static"]["act"]["mean"] / row["autoscaled"]["act"]["mean"]
    )
    t, s, i = row["tangram"], row["static"], row["isolated"]
    row["act_ratio_vs_static"] = s["act"]["mean"] / t["act"]["mean"]
    row["act_ratio_vs_isolated"] = i["act"]["mean"] / t["act"]["mean"]
    row["p99_ratio_vs_static"] = s["act"]["p99"] / t["act"]["p99"]
    row["step_speedup_vs_static"] = s["step_mean_s"] / t["step_mean_s"]
    row["step_speedup_vs_isolated"] = i["step_mean_s"] / t["step_mean_s"]
    return row


# Autoscaled Tangram: pools start at these floors and grow up to the static totals. Warm-ups: a
# sandbox container about 1 s; a reward-model replica 30 s (reward-serve measured 24-41 s for a
# judge replica on CPU, vLLM start and model load).
AUTO_MIN_CPU, AUTO_MIN_GPU = 8, 1
WARMUP_S = {"cpu": 1.0, "gpu": 30.0}


def autoscaling(cpu: float, gpu: float) -> SimAutoscaling:
    """The runtime's default policy (``queue_delay_policy``, 60 s damped scale-down) per pool."""
    floors = {"cpu": AUTO_MIN_CPU, "gpu": AUTO_MIN_GPU}
    return SimAutoscaling(
        pools={
            r: PoolScaling(
                config=AutoscalingConfig(min_units=floors[r], max_units=max(int(top), floors[r])),
                warmup_s=WARMUP_S[r],
            )
            for r, top in (("cpu", cpu), ("gpu", gpu))
        },
        period_s=1.0,
    )


def saving_at_equal_p50(steps: list, cpu: float, gpu: float, target_p50: float) -> dict:
    """Binary-search the smallest scale s of (cpu, gpu) at which Tangram's p50 <= target."""

    def p50(scale: float) -> float:
        cap = {"cpu": max(8.0, math.ceil(cpu * scale)), "gpu": max(1.0, math.ceil(gpu * scale))}
        return summarize(run(ElasticScheduler(cap), steps, "tangram").acts())["p50"]

    lo, hi = 0.0, 1.0
    if p50(hi) > target_p50:
        return {
            "scale": None,
            "saving": 0.0,
            "note": "Tangram misses the target even at equal resources",
        }
    for _ in range(12):
        mid = (lo + hi) / 2
        if p50(mid) <= target_p50:
            hi = mid
        else:
            lo = mid
    cap_cpu, cap_gpu = max(8.0, math.ceil(cpu * hi)), max(1.0, math.ceil(gpu * hi))
    cost = (cap_cpu + cap_gpu) / (cpu + gpu)  # unweighted units; both counts are reported too
    return {
        "scale": hi,
        "cpu": cap_cpu,
        "gpu": cap_gpu,
        "p50_at_scale": p50(hi),
        "target_p50": target_p50,
        "saving": 1.0 - cost,
        "cpu_saving": 1.0 - cap_cpu / cpu,
        "gpu_saving": 1.0 - cap_gpu / gpu,
    }


def decisions_per_second(
    queued: int = 10_000, iterations: int = 50_000, *, pause_gc: bool = True
) -> dict:
    """Steady state with ``queued`` actions waiting: each round one completes, one arrives, and
    ``schedule`` decides who starts. Mixed kinds, sizes and elasticity.

    ``pause_gc`` times the loop with Python's cyclic garbage collector paused, as ``timeit``
    does: whether a full collection of the 10,000 queued actions falls inside the timed loop
    depends on the process's history, and it moved one run between 36k and 57k decisions/s.
    Both ways are reported."""
    sched = ElasticScheduler({"cpu": 64.0, "gpu": 8.0})
    kinds = [
        ("sandbox.exec", (("cpu", 1.0),), 1),
        ("sandbox.run_tests", (("cpu", 1.0),), 8),
        ("reward.rm.math", (("gpu", 1.0),), 4),
        ("judge", (("cpu", 2.0), ("gpu", 1.0)), 1),
    ]
    amdahl = [tuple(0.1 + 0.9 / u for u in range(1, m + 1)) for _, _, m in kinds]

    def spec(i: int) -> ActionSpec:
        k = i % len(kinds)
        kind, demand, max_units = kinds[k]
        return ActionSpec(
            id=f"b{i}",
            kind=kind,
            demand=demand,
            max_units=max_units,
            factors=amdahl[k],
            estimated_t1=0.1 + (i * 7919 % 1000) / 100.0,
        )

    now = 0.0
    for i in range(queued):
        sched.submit(spec(i), now)
    # Arrivals are built before the clock starts: building them is the caller's cost, not ours.
    arrivals = [spec(queued + i) for i in range(iterations)]
    running = collections.deque(s.action_id for s in sched.schedule(now).starts)
    decisions = 0
    gc.collect()
    if pause_gc:
        gc.disable()
    t0 = time.perf_counter()
    for arrival in arrivals:
        now += 0.001
        sched.complete(running.popleft(), now)
        sched.submit(arrival, now)
        plan = sched.schedule(now)
        decisions += len(plan.starts) + len(plan.resizes)
        running.extend(s.action_id for s in plan.starts)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return {
        "queued": sched.queued,
        "iterations": iterations,
        "decisions": decisions,
        "seconds": elapsed,
        "decisions_per_s": decisions / elapsed,
        "gc_paused": pause_gc,
        "schedule_calls_per_s": iterations / elapsed,
    }


def cluster_scale(n_actions: int) -> dict:
    """An open-loop trace on 10,000 cores and 256 GPUs, at roughly 70% CPU load."""
    w = CodeAgentWorkload(seed=7)
    t0 = time.perf_counter()
    # ~1.8 core-seconds per code action: 4,000 arrivals/s is about 70% of 10,000 cores.
    trace = poisson_actions(n_actions, 4_000.0, w, reward_share=0.01)
    t_gen = time.perf_counter() - t0
    r = Simulator(ElasticScheduler({"cpu": 10_000.0, "gpu": 256.0}), name="cluster").run_trace(
        trace
    )
    return {
        "actions": r.n_actions,
        "cores": 10_000,
        "gpus": 256,
        "simulated_seconds": r.makespan,
        "generate_seconds": t_gen,
        "simulate_seconds": r.wall_seconds,
        "total_seconds": t_gen + r.wall_seconds,
        "us_per_action": 1e6 * r.wall_seconds / r.n_actions,
        "act": summarize(r.acts()),
        "utilisation": r.utilisation(),
    }


def critical_paths(steps: list) -> dict:
    """What the step floor is made of, worked out from the plans alone: per step, the
    trajectory whose path (its generation plus each action at its most units) is longest.

    With no queueing the step is exactly that path, so its mean must equal the simulated
    floor (a cross-check of the simulator). ``rigid_s`` is the part spent in actions that
    cannot use more than one unit: time that no scheduler can shorten."""
    paths = []
    for plans in steps:
        best: tuple[float, float, float, float] | None = None
        for plan in plans:
            gen = sum(turn.gen_s for turn in plan.turns)
            acts = [a for turn in plan.turns for a in turn.actions]
            fastest = [a.true_t1 * a.spec.factors[-1] for a in acts]
            rigid = [t for a, t in zip(acts, fastest, strict=True) if a.spec.max_units == 1]
            path = (gen + sum(fastest), gen, sum(rigid), max(rigid, default=0.0))
            if best is None or path[0] > best[0]:
                best = path
        assert best is not None
        paths.append(best)
    mean = lambda i: sum(p[i] for p in paths) / len(paths)  # noqa: E731
    return {
        "mean_s": mean(0),
        "generation_s": mean(1),
        "rigid_s": mean(2),
        "longest_rigid_action_s": mean(3),
        "rigid_share": mean(2) / mean(0),
    }


def run_workload(name: str, w: CodeAgentWorkload) -> dict:
    """The provisioning grid and the equal-p50 saving for one workload, printed as a table."""
    steps = code_agent_steps(w)
    print(f"\n== {name}: {count_actions(steps)} actions, {w.trajectories_per_step} trajectories")
    print(f"{'sandbox':>8} {'per-traj':>8} | {'ACT static':>10} {'isolated':>9} {'tangram':>8} |")
    rows = []
    for cores, per_traj in GRID:
        row = compare(w, steps, cores, per_traj)
        rows.append(row)
        print(
            f"{cores:>7.0f}c {per_traj:>8.2f} | {row['static']['act']['mean']:>9.2f}s "
            f"{row['isolated']['act']['mean']:>8.2f}s {row['tangram']['act']['mean']:>7.2f}s | "
            f"x{row['act_ratio_vs_static']:.2f} vs static, x{row['act_ratio_vs_isolated']:.2f} "
            f"vs isolated, step x{row['step_speedup_vs_static']:.2f} | autoscaled: "
            f"ACT x{row['autoscaled_act_ratio_vs_static']:.2f}, "
            f"{row['autoscaled_saving_vs_static']['all']:.0%} fewer unit-seconds"
        )
    # The step-time floor: every action starts at once on all the units it can use. No
    # scheduler's step beats it, so static's step over the floor bounds any step speed-up.
    unbounded = run(ElasticScheduler({"cpu": 1e6, "gpu": 1e4}), steps, "unbounded")
    floor = sum(unbounded.step_durations) / len(unbounded.step_durations)
    path = critical_paths(steps)
    for row in rows:
        row["step_floor_s"] = floor
        row["step_floor_critical_path"] = path
        row["step_speedup_bound_vs_static"] = row["static"]["step_mean_s"] / floor
        row["tangram_step_over_floor"] = row["tangram"]["step_mean_s"] / floor
    print(
        f"step floor (unbounded resources) {floor:.1f}s; Tangram's step is within "
        f"{max(r['tangram_step_over_floor'] for r in rows) - 1:.1%} of it in every row, so the "
        f"step speed-up over static is capped at static/floor: "
        + ", ".join(f"{r['step_speedup_bound_vs_static']:.2f}x" for r in rows)
    )
    print(
        f"the floor's critical path ({path['mean_s']:.1f}s from the plans alone): generation "
        f"{path['generation_s']:.1f}s, single-unit actions {path['rigid_s']:.1f}s "
        f"({path['rigid_share']:.0%}; the longest one {path['longest_rigid_action_s']:.1f}s), "
        "which no scheduler can shorten"
    )
    head = rows[0]
    mape = {k: round(v["mape"], 2) for k, v in head["tangram"]["estimator"].items()}
    print(f"duration estimator, mean abs. % error per kind: {mape}")
    saving = saving_at_equal_p50(steps, head["cpu"], head["gpu"], head["static"]["act"]["p50"])
    print(
        f"resources at equal p50 ACT ({saving.get('target_p50', float('nan')):.3f}s): saving "
        f"{saving['saving']:.1%} (cpu {saving.get('cpu_saving', 0):.1%}, "
        f"gpu {saving.get('gpu_saving', 0):.1%})"
    )
    return {"workload": w.model_dump(), "grid": rows, "saving": saving}


def best_row(per_workload: dict, key: str) -> dict:
    """The grid row where ``key`` is best, over every workload: the paper's figures are "up
    to" figures, so this is the like-for-like comparison; the headline keys stay at the setting
    most favourable to static."""
    name, row = max(
        ((name, row) for name, wl in per_workload.items() for row in wl["grid"]),
        key=lambda item: item[1][key],
    )
    return {
        "value": row[key],
        "workload": name,
        "sandbox_cores": row["sandbox_cores"],
        "sandboxes_per_trajectory": row["sandboxes_per_trajectory"],
    }


# (cores per sandbox, sandboxes per concurrent trajectory) for the static baseline.
GRID = [(1.0, 1.0), (2.0, 1.0), (1.0, 0.5), (2.0, 0.5), (2.0, 0.25)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "tangram_sim.json")
    args = parser.parse_args(argv)
    quick = args.quick
    n_traj, n_steps = (64, 2) if quick else (256, 4)
    workloads = {
        # Calibrated to the paper digest: tool calls mostly under 1 s, generation dominates.
        "paper_like": CodeAgentWorkload(trajectories_per_step=n_traj, steps=n_steps),
        # SWE-style agents: builds and test suites of seconds, shorter generations per turn.
        "tool_heavy": CodeAgentWorkload(
            trajectories_per_step=n_traj,
            steps=n_steps,
            gen_median_s=3.0,
            exec_median_s=2.0,
            exec_sigma=1.0,
            tail_fraction=0.08,
            tests_fraction=0.7,
        ),
    }
    per_workload = {name: run_workload(name, w) for name, w in workloads.items()}
    head = per_workload["paper_like"]["grid"][0]
    saving = per_workload["paper_like"]["saving"]

    # Median of three runs each way: one run on a shared 2-core machine can lose 20% to a
    # neighbour.
    def median_run(pause_gc: bool) -> dict:
        runs = sorted(
            (
                decisions_per_second(iterations=5_000 if quick else 50_000, pause_gc=pause_gc)
                for _ in range(3)
            ),
            key=lambda r: r["decisions_per_s"],
        )
        return {**runs[1], "runs_decisions_per_s": [r["decisions_per_s"] for r in runs]}

    speed = median_run(pause_gc=True)
    speed_gc = median_run(pause_gc=False)
    speed["gc_on"] = speed_gc
    print(f"scheduler, garbage collector running: {speed_gc['decisions_per_s']:,.0f} decisions/s")
    print(
        f"\nscheduler: {speed['decisions_per_s']:,.0f} decisions/s (garbage collector paused, "
        f"as timeit does), {speed['queued']:,} queued"
    )
    cluster = cluster_scale(50_000 if quick else 1_000_000)
    print(
        f"cluster: {cluster['actions']:,} actions on {cluster['cores']:,} cores + "
        f"{cluster['gpus']} GPUs in {cluster['total_seconds']:.1f}s "
        f"({cluster['us_per_action']:.1f} us/action), util {cluster['utilisation']}"
    )
    up_to = {
        key: best_row(per_workload, key)
        for key in ("act_ratio_vs_static", "step_speedup_vs_static")
    }
    for key, best in up_to.items():
        print(
            f"up to (best setting, as the paper reports): {key} x{best['value']:.2f} "
            f"({best['workload']}, {best['sandbox_cores']:g}-core sandboxes, "
            f"{best['sandboxes_per_trajectory']:g} per trajectory)"
        )
    result = {
        "benchmark": "tangram_sim",
        "quick": quick,
        "headline_setting": "paper_like workload; static: one 1-core sandbox per trajectory and "
        "2 GPUs per reward model; Tangram gets equal totals",
        "act_ratio_vs_static": head["act_ratio_vs_static"],
        "act_ratio_vs_isolated": head["act_ratio_vs_isolated"],
        "resource_saving_at_equal_p50_act": saving["saving"],
        "step_speedup_vs_static": head["step_speedup_vs_static"],
        "decisions_per_s": speed["decisions_per_s"],
        "decisions_per_s_gc_on": speed_gc["decisions_per_s"],
        "sim_1m_actions_seconds": None if quick else cluster["total_seconds"],
        "targets": {
            "act_ratio_vs_static": 4.3,
            "resource_saving_at_equal_p50_act": 0.71,
            "step_speedup_vs_static": 1.5,
            "decisions_per_s": 50_000,
            "sim_1m_actions_seconds": 60,
        },
        "up_to": up_to,
        "workloads": per_workload,
        "scheduler_speed": speed,
        "cluster": cluster,
        "versions": machine_info("tangram-core"),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
