"""Synthetic agentic-RL workloads for the simulator, and recorded traces (JSONL).

Calibration (``shared/papers/arl-tangram.md``, "Evaluation to reproduce"); every number is a
field of :class:`CodeAgentWorkload`:

* **Code-agent RL.** A trajectory takes 2-6 tool turns. Before each turn the policy generates
  for a lognormal time (median 6 s). Each tool call runs code with a heavy-tailed duration:
  "most under 1 s, a tail of tens of seconds". That is a lognormal with a 0.4 s median
  (sigma 1.2), plus a Pareto tail (alpha 1.5, from 10 s, capped at 120 s) for 4% of calls.
  Half the calls run a batch of tests, which parallelises across cores (Amdahl, 90% parallel,
  up to 8 cores); the others are single-core executions.
* **Reward bursts.** Every trajectory ends with a reward-model call (GPU), so the calls of a
  step arrive in a burst as rollouts finish. There are four reward models (tasks), and a
  trajectory's task picks its model. A call takes about 1.5 s on one GPU replica and can
  split across up to 4 replicas (Amdahl, 85% parallel).

All draws come from one seeded ``random.Random``, so a workload is reproducible.
"""

from __future__ import annotations

import functools
import json
import math
import random
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_core.elasticity import Amdahl
from tangram_core.scheduler import ActionSpec
from tangram_core.sim.engine import SimAction, TrajectoryPlan, Turn

REWARD_MODELS = ("reward.rm.math", "reward.rm.code", "reward.judge", "reward.rm.safety")


class CodeAgentWorkload(BaseModel):
    """Parameters of the code-agent + reward-burst workload (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    trajectories_per_step: int = Field(64, ge=1)
    steps: int = Field(4, ge=1)
    min_turns: int = Field(2, ge=1)
    max_turns: int = Field(6, ge=1)
    gen_median_s: float = Field(6.0, gt=0, description="Median LLM generation per turn.")
    gen_sigma: float = Field(0.6, ge=0)
    exec_median_s: float = Field(0.4, gt=0, description="Median code execution, one core.")
    exec_sigma: float = Field(1.2, ge=0)
    tail_fraction: float = Field(0.04, ge=0, le=1, description="Share of calls in the long tail.")
    tail_min_s: float = Field(10.0, gt=0)
    tail_alpha: float = Field(1.5, gt=0)
    tail_cap_s: float = Field(120.0, gt=0)
    tests_fraction: float = Field(0.5, ge=0, le=1, description="Share of calls that run tests.")
    tests_max_cores: int = Field(8, ge=1)
    tests_parallel_fraction: float = Field(0.9, ge=0, le=1)
    reward_s: float = Field(1.5, gt=0, description="Reward-model call on one GPU replica.")
    reward_max_replicas: int = Field(4, ge=1)
    reward_parallel_fraction: float = Field(0.85, ge=0, le=1)
    reward_models: tuple[str, ...] = REWARD_MODELS
    reward_gpus: tuple[int, ...] = Field(
        (),
        description="GPUs each reward model's call needs at once, rigid (parallel to "
        "reward_models, e.g. (1, 2, 4)); empty: calls are elastic over 1..reward_max_replicas.",
    )
    feature_corr: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Correlation between a code action's log duration and the log of the sizes "
        "its payload carries (code_bytes; tests for test runs, at 0.6 of it): how much a "
        "payload-aware estimator can know before the run. 0: no features.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _rigid_rewards(self) -> CodeAgentWorkload:
        if self.reward_gpus and len(self.reward_gpus) != len(self.reward_models):
            raise ValueError(
                f"reward_gpus has {len(self.reward_gpus)} entries but reward_models has "
                f"{len(self.reward_models)}: give one GPU count per reward model"
            )
        if any(g < 1 for g in self.reward_gpus):
            raise ValueError(f"every reward_gpus entry must be >= 1; got {self.reward_gpus}")
        return self


@functools.lru_cache(maxsize=1024)
def _factors(min_units: int, max_units: int, parallel_fraction: float) -> tuple[float, ...]:
    model = Amdahl(parallel_fraction=parallel_fraction)
    return tuple(model.factor(u) for u in range(min_units, max_units + 1))


def tool_action(
    rng: random.Random, w: CodeAgentWorkload, action_id: str, trajectory_id: str | None
) -> SimAction:
    """One code-execution call: a lognormal duration with a Pareto tail, tests or a single run.

    Shared by :func:`code_agent_steps` and the RL-loop model (:mod:`.rl_loop`), so both draw tool
    calls from one calibrated distribution (three draws from ``rng``, in a fixed order)."""
    if rng.random() < w.tail_fraction:
        dur = min(w.tail_min_s * rng.paretovariate(w.tail_alpha), w.tail_cap_s)
    else:
        dur = rng.lognormvariate(math.log(w.exec_median_s), w.exec_sigma)
    tests = rng.random() < w.tests_fraction
    spec = ActionSpec(
        id=action_id,
        kind="sandbox.run_tests" if tests else "sandbox.run",
        demand=(("cpu", 1.0),),
        max_units=w.tests_max_cores if tests else 1,
        factors=_factors(1, w.tests_max_cores, w.tests_parallel_fraction) if tests else (1.0,),
        trajectory_id=trajectory_id,
        features=_code_features(w, action_id, dur, tests),
    )
    return SimAction(spec, dur)


def _code_features(
    w: CodeAgentWorkload, action_id: str, dur: float, tests: bool
) -> tuple[tuple[str, float], ...]:
    """What a code action's payload says about its size, correlated ``w.feature_corr`` (in log
    space) with its duration. Drawn from a generator of its own, seeded by the action id, so
    that turning features on or off leaves every other draw of the workload unchanged."""
    rho = w.feature_corr
    if rho <= 0:
        return ()
    frng = random.Random(zlib.crc32(f"{w.seed}:{action_id}".encode()))
    z = (math.log(dur) - math.log(w.exec_median_s)) / max(w.exec_sigma, 1e-9)
    noise = math.sqrt(max(1.0 - rho * rho, 0.0))
    code = rho * z + noise * frng.gauss(0.0, 1.0)
    feats = [("code_bytes", float(round(1500 * math.exp(0.8 * code))))]
    if tests:
        r2 = 0.6 * rho
        n = r2 * z + math.sqrt(1.0 - r2 * r2) * frng.gauss(0.0, 1.0)
        feats.append(("tests", float(max(1, round(6 * math.exp(0.5 * n))))))
    return tuple(feats)


def reward_action(
    rng: random.Random, w: CodeAgentWorkload, action_id: str, trajectory_id: str | None, kind: str
) -> SimAction:
    """One reward-model call of ``kind`` on the GPU pool, elastic across replicas (one draw), or
    rigid on ``w.reward_gpus`` GPUs at once where the workload sets them."""
    if w.reward_gpus:
        gpus = w.reward_gpus[w.reward_models.index(kind)]
        rigid = ActionSpec(
            id=action_id, kind=kind, demand=(("gpu", float(gpus)),), trajectory_id=trajectory_id
        )
        return SimAction(rigid, w.reward_s * rng.uniform(0.7, 1.3))
    spec = ActionSpec(
        id=action_id,
        kind=kind,
        demand=(("gpu", 1.0),),
        max_units=w.reward_max_replicas,
        factors=_factors(1, w.reward_max_replicas, w.reward_parallel_fraction),
        trajectory_id=trajectory_id,
    )
    return SimAction(spec, w.reward_s * rng.uniform(0.7, 1.3))


def code_agent_steps(w: CodeAgentWorkload) -> list[list[TrajectoryPlan]]:
    """Build ``w.steps`` synchronous RL steps of ``w.trajectories_per_step`` trajectories."""
    rng = random.Random(w.seed)
    mu_gen = math.log(w.gen_median_s)
    steps: list[list[TrajectoryPlan]] = []
    n = 0
    for step in range(w.steps):
        plans = []
        for t in range(w.trajectories_per_step):
            traj = f"s{step}t{t}"
            task = w.reward_models[rng.randrange(len(w.reward_models))]
            turns = []
            for _ in range(rng.randint(w.min_turns, w.max_turns)):
                tool = tool_action(rng, w, f"a{n}", traj)
                n += 1
                turns.append(Turn(rng.lognormvariate(mu_gen, w.gen_sigma), (tool,)))
            reward = reward_action(rng, w, f"a{n}", traj, task)
            n += 1
            turns.append(Turn(rng.lognormvariate(mu_gen, w.gen_sigma), (reward,)))
            plans.append(TrajectoryPlan(traj, tuple(turns)))
        steps.append(plans)
    return steps


def count_actions(steps: Sequence[Sequence[TrajectoryPlan]]) -> int:
    return sum(len(turn.actions) for plans in steps for p in plans for turn in p.turns)


# -- recorded traces ------------------------------------------------------------------------------


class TraceRecord(BaseModel):
    """One line of a recorded trace: an action, when it arrived, and how long it really took."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    kind: str
    arrival_s: float = Field(ge=0)
    duration_s: float = Field(gt=0, description="True single-unit duration T(1).")
    demand: dict[str, float] = Field(default_factory=lambda: {"cpu": 1.0})
    min_units: int = Field(1, ge=1)
    max_units: int = Field(1, ge=1)
    parallel_fraction: float = Field(0.9, ge=0, le=1)
    size: float = Field(1.0, gt=0)
    trajectory_id: str | None = None

    def to_sim(self) -> tuple[float, SimAction]:
        spec = ActionSpec(
            id=self.id,
            kind=self.kind,
            demand=tuple(sorted(self.demand.items())),
            min_units=self.min_units,
            max_units=self.max_units,
            factors=_factors(self.min_units, self.max_units, self.parallel_fraction),
            size=self.size,
            trajectory_id=self.trajectory_id,
        )
        return self.arrival_s, SimAction(spec, self.duration_s)


def load_trace(path: Path) -> list[tuple[float, SimAction]]:
    """Read a JSONL trace; a bad line fails with its line number and the field at fault."""
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(TraceRecord.model_validate_json(line).to_sim())
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: invalid trace record: {exc}") from exc
    out.sort(key=lambda item: item[0])
    return out


def save_trace(records: Iterable[TraceRecord], path: Path) -> int:
    n = 0
    with open(path, "w") as fh:
        for record in records:
            fh.write(record.model_dump_json() + "\n")
            n += 1
    return n


def poisson_actions(
    n: int,
    rate_per_s: float,
    w: CodeAgentWorkload,
    *,
    reward_share: float = 0.2,
) -> list[tuple[float, SimAction]]:
    """An open-loop mix of code and reward actions arriving at ``rate_per_s`` (cluster scale).

    Built directly as simulator actions (no per-action validation): a million of them take a few
    seconds. Recorded traces from outside go through :func:`load_trace` instead.
    """
    rng = random.Random(w.seed)
    mu_exec = math.log(w.exec_median_s)
    tests_factors = _factors(1, w.tests_max_cores, w.tests_parallel_fraction)
    reward_factors = _factors(1, w.reward_max_replicas, w.reward_parallel_fraction)
    cpu, gpu = (("cpu", 1.0),), (("gpu", 1.0),)
    out: list[tuple[float, SimAction]] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate_per_s)
        if rng.random() < reward_share:
            kind = w.reward_models[i % len(w.reward_models)]
            spec = ActionSpec(
                f"r{i}", kind, gpu, max_units=w.reward_max_replicas, factors=reward_factors
            )
            out.append((t, SimAction(spec, w.reward_s * rng.uniform(0.7, 1.3))))
            continue
        if rng.random() < w.tail_fraction:
            dur = min(w.tail_min_s * rng.paretovariate(w.tail_alpha), w.tail_cap_s)
        else:
            dur = rng.lognormvariate(mu_exec, w.exec_sigma)
        if rng.random() < w.tests_fraction:
            spec = ActionSpec(
                f"c{i}",
                "sandbox.run_tests",
                cpu,
                max_units=w.tests_max_cores,
                factors=tests_factors,
            )
        else:
            spec = ActionSpec(f"c{i}", "sandbox.run", cpu)
        out.append((t, SimAction(spec, dur)))
    return out


def summarize(acts: Sequence[float]) -> dict[str, float]:
    """Mean and quantiles of a list of ACTs (seconds)."""
    if not acts:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    xs = sorted(acts)

    def q(p: float) -> float:
        return xs[min(int(p * len(xs)), len(xs) - 1)]

    return {"n": len(xs), "mean": sum(xs) / len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def dump_result(result: object, path: Path) -> None:
    """Write a run as JSONL, one action per line (what ``tangram-core report`` reads)."""
    fields = ("kinds", "submit", "start", "end", "units")
    kinds, submit, start, end, units = (getattr(result, k) for k in fields)
    with open(path, "w") as fh:
        for k, s, b, e, u in zip(kinds, submit, start, end, units, strict=True):
            line = {"kind": k, "submit": s, "start": b, "end": e, "units": round(u, 4)}
            fh.write(json.dumps(line) + "\n")
