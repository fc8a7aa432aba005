"""The GRPO run on a Ray cluster: the same loop as :class:`~r1_train.trainer.Trainer`, with the
policy replaced by trainer ranks (:class:`~r1_train.rank_group.RankGroup`) and the engine by
a pool of vLLM engines (:class:`~r1_train.engine_pool.EnginePool`), each role in its own
placement group.

    ray start --head
    r1-train run --config configs/arithmetic.yaml cluster.address=auto \\
        cluster.trainer.ranks=2 cluster.rollout.engines=2

The driver (this process) keeps what is light and global: the data, the agent loop, the
tangram-core orchestrator and its services (rewards on Ray Serve, anywhere on the cluster),
metrics and checkpoints. Checkpoints are written by the driver from rank 0's gathered state,
in the same format as the one-process run, so either can resume the other, on any number of
ranks. ``model.path`` must be readable on every node that holds a trainer rank or an engine
(a shared filesystem, as verl and OpenRLHF assume).

Where everything landed is written to ``RUN_DIR/cluster.json``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from r1_train import placement
from r1_train.config import ModelConfig, TrainConfig
from r1_train.engine_pool import EnginePool, EngineWorker, RemoteStream
from r1_train.rank_group import RankGroup
from r1_train.rollout import RolloutEngine
from r1_train.trainer import Trainer
from r1_train.trainer_rank import TrainerRank

LAYOUT_FILE = "cluster.json"


class ClusterTrainer(Trainer):
    """A :class:`Trainer` whose ranks and engines are Ray actors; ``cfg.cluster`` must be set."""

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.cluster is None:
            raise ValueError("ClusterTrainer needs cfg.cluster (the cluster.* fields)")
        self.cluster = cfg.cluster
        self.roles: list[placement.Role] = []
        self._actors: list[Any] = []
        self._ranks: RankGroup | None = None
        self._pool: EnginePool | None = None
        self.split = False
        self._started_ray = placement.connect(cfg.cluster)
        try:
            super().__init__(cfg)
        except BaseException:
            self._teardown()
            raise
        self.write_layout()

    def _make_policy(self, model_cfg: ModelConfig, resume_from: Path | None) -> RankGroup:
        import ray
        import torch

        c = self.cluster
        t = c.trainer
        several = len(placement.alive_nodes()) > 1
        self.split = c.layout == "split" or (c.layout == "auto" and several)
        role = placement.reserve(
            "trainer",
            t.ranks,
            placement.bundle(t.num_cpus, t.num_gpus, t.resources),
            t.strategy,
            timeout_s=c.placement_timeout_s,
        )
        self.roles.append(role)
        actor = ray.remote(TrainerRank)
        ranks = [
            actor.options(**role.actor_options(i, t.num_cpus, t.num_gpus)).remote(
                i, t.ranks, self.cfg
            )
            for i in range(t.ranks)
        ]
        self._actors += ranks
        places = ray.get([r.where.remote() for r in ranks])
        init = ray.get(ranks[0].rendezvous.remote()) if t.ranks > 1 else None
        group = RankGroup(
            ranks, places, dtype=torch.float32, model_path=model_cfg.path, run_dir=self.run_dir
        )
        resume = str(resume_from) if resume_from is not None else None
        dtypes = group._gather(
            [r.setup.remote(str(model_cfg.path), init, resume) for r in ranks],
            "start-up (joining the group, loading the policy)",
        )
        group.dtype = torch.bfloat16 if dtypes[0] == "bfloat16" else torch.float32
        self._ranks = group
        return group

    def _make_engine(self, model_cfg: ModelConfig, resume_from: Path | None) -> RolloutEngine:
        import ray

        c = self.cluster
        r = c.rollout
        avoid = self.roles[0].nodes if self.split else None
        role = placement.reserve(
            "rollout",
            r.engines,
            placement.bundle(r.num_cpus, r.num_gpus, r.resources),
            r.strategy,
            avoid_nodes=avoid,
            timeout_s=c.placement_timeout_s,
        )
        self.roles.append(role)
        import torch

        dtype = "bfloat16" if self.policy.dtype == torch.bfloat16 else "float32"
        actor = ray.remote(EngineWorker)
        workers = [
            actor.options(**role.actor_options(i, r.num_cpus, r.num_gpus)).remote(
                i, str(model_cfg.path), self.cfg.rollout, self.cfg.run.seed, dtype
            )
            for i in range(r.engines)
        ]
        self._actors += workers
        try:
            places = ray.get([w.where.remote() for w in workers])
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"a rollout engine failed to start: {str(exc).strip().splitlines()[0][:500]}"
            ) from exc
        self._pool = EnginePool(workers, places, Path(model_cfg.path).name)
        return self._pool

    def streaming_engine(self) -> RemoteStream:
        """``run.mode async`` on the cluster: every engine streams, weights land in each between
        two of its decode steps."""
        assert self._pool is not None  # built in __init__
        a = self.cfg.asynchronous
        return RemoteStream(
            self._pool, version=self.version, on_update=a.on_update, recompute_kv=a.recompute_kv
        )

    def metrics_row(
        self,
        trajs: list[Any],
        info: dict[str, int],
        update: dict[str, float],
        clock: dict[str, float],
    ) -> dict[str, Any]:
        row = super().metrics_row(trajs, info, update, clock)
        if self._pool is not None:
            row.update(self._pool.take_stats())
            row["time/engine_sync"] = self._pool.last_sync_s
        row["trainer_ranks"] = len(self._ranks.ranks) if self._ranks else 0
        return row

    def _services(self) -> Any:
        from r1_train.services import services

        return services(self.cfg, on_open=self._services_opened)

    def _services_opened(self, managers: list[Any]) -> None:
        """Record where the services landed (the sandbox pool's node) in cluster.json."""
        self.service_nodes = {
            m.name: m.node_id for m in managers if getattr(m, "node_id", None) is not None
        }
        self.write_layout()

    def layout(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "trainer": self._ranks.describe() if self._ranks else [],
            "rollout": [dict(p) for p in self._pool.places] if self._pool else [],
            "services": dict(getattr(self, "service_nodes", {})),
        }

    def write_layout(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / LAYOUT_FILE).write_text(json.dumps(self.layout(), indent=2))

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        """Stop every actor, free every placement group, and leave Ray if this run joined it:
        nothing of the run stays on the cluster, whether it ended or failed."""
        import ray

        if self._ranks is not None:
            self._ranks.close()
        if self._pool is not None and getattr(self, "engine", None) is not self._pool:
            self._pool.close()
        for handle in self._actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(handle)
        placement.release(self.roles)
        self.roles = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
