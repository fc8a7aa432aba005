"""Where a cluster run's actors go: joining Ray, one placement group per role, the layout.

Ray is the cluster manager; nothing here is home-made. Each role (trainer ranks, rollout
engines) reserves one placement-group bundle per member with the role's strategy, so a role
either fits whole or fails before anything starts, and its members never fight over a node's
CPUs or GPUs. The split layout (the default on several nodes) keeps the engines off the nodes
that hold trainer ranks: the rollout placement group's bundles carry a label selector that
excludes those nodes (``ray.io/node-id``, a label every Ray node has).

A colocated layout (a trainer rank and an engine sharing each GPU, the engine asleep during the
update, as verl's hybrid engine does) would be a third value of ``cluster.layout``: one
placement group whose bundles each hold a rank and an engine, both actors with a fractional GPU,
and the engine's weights and KV cache released (vLLM's ``sleep``/``wake_up``) around every
update. It is not built: vLLM's sleep mode needs CUDA, and nothing here could test it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from r1_train.config import ClusterConfig

# Variables the driver's processes read that the actors need too (Ray starts actors with the
# environment of the node's raylet, which a `ray start` on another machine did not inherit).
FORWARDED_ENV_PREFIXES = ("OTEL_", "VLLM_", "HF_", "TRANSFORMERS_", "OMP_", "TOKENIZERS_")


class PlacementError(RuntimeError):
    """The cluster cannot hold a role: says what was asked for and what the cluster offers."""


def forwarded_env(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) if env is None else env
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def connect(cfg: ClusterConfig) -> bool:
    """Join (or, with ``address: local``, start) Ray; True when this run started it.

    A Ray already initialised in this process (a test, ``ray job submit``'s driver) is used
    as it is."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": forwarded_env()}
    kwargs: dict[str, Any] = {"log_to_driver": False, "runtime_env": runtime_env}
    if cfg.address == "local":
        ray.init(address="local", include_dashboard=False, **kwargs)
        return True
    try:
        ray.init(address=cfg.address, **kwargs)
    except ConnectionError as exc:
        raise PlacementError(
            f"cluster.address {cfg.address!r}: no Ray cluster there ({exc}). Start one with "
            "`ray start --head`, set RAY_ADDRESS, or use cluster.address=local to run on a "
            "Ray started for this run"
        ) from None
    return True


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    out = {"CPU": num_cpus, **resources}
    if num_gpus:
        out["GPU"] = num_gpus
    return out


@dataclass
class Role:
    """A role's placement group and the node each of its bundles landed on."""

    name: str
    group: Any
    nodes: list[str] = field(default_factory=list)

    def actor_options(self, index: int, num_cpus: float, num_gpus: float) -> dict[str, Any]:
        """Ray actor options that put member ``index`` in its bundle, never restarted (a dead
        rank or engine is handled by the run: re-dispatch, or a clear stop)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "max_restarts": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index
            ),
        }


def reserve(
    name: str,
    members: int,
    shape: dict[str, float],
    strategy: str,
    *,
    avoid_nodes: list[str] | None = None,
    timeout_s: float,
) -> Role:
    """One bundle of ``shape`` per member, with ``strategy``, on nodes not in ``avoid_nodes``.

    Raises :class:`PlacementError` after ``timeout_s`` (the group is removed, nothing stays
    reserved), naming the request and the cluster's free resources."""
    import ray
    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    selector = None
    if avoid_nodes:
        selector = [{"ray.io/node-id": f"!in({','.join(sorted(set(avoid_nodes)))})"}] * members
    group = placement_group(
        [dict(shape) for _ in range(members)],
        strategy=strategy,
        name=f"r1-train-{name}-{os.getpid()}-{time.monotonic_ns()}",
        bundle_label_selector=selector,  # type: ignore[arg-type]  # Ray's hint is too narrow
    )
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        where = " on nodes without a trainer rank (cluster.layout split)" if avoid_nodes else ""
        free = ray.available_resources()
        raise PlacementError(
            f"cluster.{name}: {members} bundle(s) of {shape} with strategy {strategy}{where} "
            f"did not fit within {timeout_s:.0f} s; the cluster has {len(alive_nodes())} "
            f"node(s) and {_short(free)} free. Lower the role's num_cpus/num_gpus or members, "
            "add nodes, or set cluster.layout=shared"
        )
    table = placement_group_table(group)
    by_bundle = table.get("bundles_to_node_id", {})
    return Role(name, group, [str(by_bundle[i]) for i in range(members)])


def release(roles: list[Role]) -> None:
    """Remove the roles' placement groups (their actors must be gone first, or Ray kills them)."""
    from ray.util.placement_group import remove_placement_group

    for role in roles:
        # the cluster may have gone away with it: then nothing is left to remove
        with contextlib.suppress(Exception):
            remove_placement_group(role.group)


def _short(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory"))}
    keep = {k: v for k, v in keep.items() if k != "object_store_memory"}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
