"""The run's external services, started and stopped by the run: Ray, the reward deployments,
the sandbox pool, and the tangram-core orchestrator that schedules actions on them.

Only what the config needs starts: no sandbox without tools or code rewards, no Ray without
rule or model rewards. A Ray that is already running (``ray.init`` by the caller, or
``RAY_ADDRESS``) is joined and left running; one we start, we stop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from r1_train.config import TrainConfig
from r1_train.rewards import KIND_RM, KIND_RULES, RULES

APP_RULES = "r1-rules"
APP_RM = "r1-rm"


def _require(module: str, extra: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"{why} needs {module}, which is not installed: install the sibling package "
            f"(pip install packages/{extra.replace('rewards', 'reward-serve')}) or "
            f"'tangram-r1-train[{extra}]'"
        )


def _needs(cfg: TrainConfig) -> tuple[bool, bool]:
    sandbox = cfg.agent.max_turns > 1 or "code" in cfg.rewards.weights
    if cfg.run.eval_every and cfg.eval is not None:  # HumanEval and code tasks run programs
        sandbox = sandbox or cfg.eval.benchmark == "humaneval" or cfg.held_out_task.kind == "code"
    ray = any(r in cfg.rewards.weights for r in (*RULES, "rm"))
    return sandbox, ray


def _start_ray() -> bool:
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        # "local": a Ray of this run's own. A plain ray.init() would join whatever cluster a
        # `ray start` (anyone's, on a shared machine) last recorded in /tmp/ray, and then
        # refuse num_cpus; joining a cluster is asked for with RAY_ADDRESS or cluster.address.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(2, os.cpu_count() or 2)
    ray.init(**kwargs)
    return True


def run_app_name(base: str) -> str:
    """This run's name for a Serve app: runs that share a cluster must not replace (or, when
    they end, delete) each other's reward apps."""
    return f"{base}-{os.getpid()}"


def _deploy(cfg: TrainConfig) -> list[Any]:
    """Serve apps for the configured rewards; returns their RewardManagers."""
    from ray import serve

    from tangram_reward.manager import RewardManager, RewardManagerConfig
    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    managers = []
    otel = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    # Handles only: no HTTP proxy listening on the node (a Serve already running is kept).
    serve.start(proxy_location="Disabled")
    if any(r in cfg.rewards.weights for r in RULES):
        rules = RewardDeploymentConfig(
            name=APP_RULES,
            kind="rules",
            num_cpus=0.25,
            num_replicas=cfg.rewards.rule_replicas,
            env=otel,
        )
        app = run_app_name(APP_RULES)
        serve.run(build_app(rules), name=app, route_prefix=None, external_scaler_enabled=True)
        managers.append(
            RewardManager(
                RewardManagerConfig(
                    app=app,
                    deployment=APP_RULES,  # the deployment keeps its name
                    kinds=(KIND_RULES,),
                    resource="reward",
                    min_replicas=cfg.rewards.rule_replicas,
                    max_replicas=cfg.rewards.rule_replicas,
                    concurrency_per_replica=32,
                )
            )
        )
    if "rm" in cfg.rewards.weights:
        rm = RewardDeploymentConfig(
            name=APP_RM,
            kind="scalar_rm",
            model_path=str(cfg.rewards.rm_path),
            num_cpus=0.5,
            env=otel,
        )
        app = run_app_name(APP_RM)
        serve.run(build_app(rm), name=app, route_prefix=None, external_scaler_enabled=True)
        managers.append(
            RewardManager(
                RewardManagerConfig(
                    app=app,
                    deployment=APP_RM,
                    kinds=(KIND_RM,),
                    resource="reward_rm",
                    min_replicas=1,
                    max_replicas=1,
                    concurrency_per_replica=16,
                )
            )
        )
    return managers


def _cluster_sandbox(cfg: TrainConfig, pool: Any) -> Any:
    """The sandbox pool in a Ray actor: one CPU per worker reserved (``cluster.sandbox``
    may say otherwise), placed by Ray where the CPUs are free, or where ``resources`` are."""
    from tangram_sandbox.ray_manager import RaySandboxManager

    assert cfg.cluster is not None
    where = cfg.cluster.sandbox
    options: dict[str, Any] = {
        "num_cpus": where.num_cpus if where.num_cpus is not None else float(cfg.sandbox.workers)
    }
    if where.resources:
        options["resources"] = dict(where.resources)
    return RaySandboxManager(
        pool, actor_options=options, open_timeout_s=cfg.cluster.placement_timeout_s
    )


def _scheduler(cfg: TrainConfig, managers: list[Any]) -> Any:
    """None (tangram's elastic scheduler), or the static per-trajectory lease baseline."""
    if cfg.sandbox.provisioning == "tangram":
        return None
    from tangram_core.baselines import StaticLeaseScheduler

    fleets = {
        kind: m.resources() for m in managers for kind in m.kinds if kind.startswith("reward.")
    }
    return StaticLeaseScheduler(cfg.sandbox.workers, {"cpu": 1.0}, fleets=fleets)


@contextlib.asynccontextmanager
async def services(
    cfg: TrainConfig, *, on_open: Callable[[list[Any]], None] | None = None
) -> AsyncIterator[Any]:
    """An open orchestrator over the run's pools; everything is torn down on exit.

    On a cluster (``cfg.cluster``) the sandbox pool runs in a Ray actor the cluster places
    (``cluster.sandbox``), not on the driver's node. ``on_open`` is called with the opened
    managers (the cluster run records where they landed)."""
    from tangram_core.orchestrator import Orchestrator

    need_sandbox, need_ray = _needs(cfg)
    managers: list[Any] = []
    started_ray = False
    try:
        if need_sandbox:
            _require("tangram_sandbox", "sandbox", "tool calls and code rewards")
            from tangram_sandbox.config import PoolConfig
            from tangram_sandbox.manager import SandboxManager

            workers = cfg.sandbox.workers
            pool = PoolConfig(min_workers=workers, max_workers=workers)
            if cfg.cluster is not None:
                managers.append(_cluster_sandbox(cfg, pool))
            else:
                managers.append(SandboxManager(pool))
        if need_ray:
            _require("tangram_reward", "rewards", "rule and model rewards")
            started_ray = _start_ray()
            managers += _deploy(cfg)
        if not managers:
            from r1_train.agent_loop import NoServices

            yield NoServices()
            return
        if cfg.sandbox.provisioning == "static":
            for m in managers:  # a static partition is sized from the pools as they will run
                await m.open()
        async with Orchestrator(managers, scheduler=_scheduler(cfg, managers)) as orch:
            if on_open is not None:
                on_open(managers)
            yield orch
    finally:
        if need_ray:
            from ray import serve

            if started_ray:  # our own Ray: Serve and Ray go with the run
                import ray

                with contextlib.suppress(Exception):
                    serve.shutdown()  # type: ignore[no-untyped-call]
                ray.shutdown()
            else:  # a shared cluster: only this run's apps go, other runs' stay up
                for name in (run_app_name(APP_RULES), run_app_name(APP_RM)):
                    with contextlib.suppress(Exception):
                        serve.delete(name)
