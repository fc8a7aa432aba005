"""r1-train's asynchronous mode end to end on the tiny model (vLLM, sandbox, rewards, Ray).

* With ``max_staleness = 0`` it is the synchronous schedule: the same samples and the same
  losses as the synchronous trainer on the same seeds.
* With ``max_staleness = 1`` the rollouts of the next step overlap the update, and no trained
  token was sampled by a policy more than one version older than the one being trained.
* One trace holds the run: rollouts, tool actions and updates, each with its policy version.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from r1_train.config import load_config
from r1_train.trainer import Trainer
from tangram_core import semconv as sc
from tangram_sandbox.isolation import capabilities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _needs_sandbox() -> None:
    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")


def _cfg(model: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model}",
            "model.dtype=float32",
            "rollout.group_size=3",
            "rollout.max_new_tokens=12",
            "rollout.max_total_tokens=256",
            "agent.max_turns=2",
            "agent.prefill='<code>print(6 * 7)</code>'",
            "agent.lockstep=false",
            "task.kind=arithmetic",
            "task.size=8",
            "rewards.weights={math: 1.0, format: 0.5}",
            "optim.lr=0.001",
            "optim.micro_batch_size=6",
            "run.prompts_per_step=2",
            "run.progress=false",
            f"run.out_dir={out}",
            *extra,
        ],
    )


def _run(cfg) -> list:
    trainer = Trainer(cfg)
    try:
        return asyncio.run(trainer.train())
    finally:
        trainer.close()


def test_zero_staleness_is_the_synchronous_schedule(
    tiny_model_dir: Path, tmp_path: Path, ray_session
) -> None:
    sync = _run(_cfg(tiny_model_dir, tmp_path / "sync", "run.steps=2"))
    asyn = _run(
        _cfg(
            tiny_model_dir,
            tmp_path / "async",
            "run.steps=2",
            "run.mode=async",
            "asynchronous.max_staleness=0",
        )
    )
    assert [r.step for r in asyn] == [0, 1]
    for s, a in zip(sync, asyn, strict=True):
        ours = {t.id: t for t in a.trajectories}
        assert sorted(ours) == sorted(t.id for t in s.trajectories)
        for t in s.trajectories:
            assert ours[t.id].completion_ids == t.completion_ids, t.id
            assert ours[t.id].reward == t.reward, t.id
        assert a.metrics["staleness_max"] == 0
        assert a.metrics["loss"] == pytest.approx(s.metrics["loss"], rel=1e-4, abs=1e-7)
        assert a.metrics["mismatch/kl"] == pytest.approx(s.metrics["mismatch/kl"], abs=1e-4)


def test_staleness_one_overlaps_and_keeps_the_bound(
    tiny_model_dir: Path, tmp_path: Path, ray_session, span_exporter
) -> None:
    k = 1
    results = _run(
        _cfg(
            tiny_model_dir,
            tmp_path / "async",
            "run.steps=3",
            "run.mode=async",
            f"asynchronous.max_staleness={k}",
        )
    )
    assert [r.step for r in results] == [0, 1, 2]
    for r in results:
        trained = r.metrics["policy_version"] - 1  # the version this step's update started from
        assert 0 <= r.metrics["staleness_max"] <= k
        for t in r.trajectories:
            assert t.oldest_version is not None
            assert trained - t.oldest_version <= k, (t.id, t.versions)
            trained_versions = [v for v, m in zip(t.versions, t.mask, strict=True) if m]
            assert all(v >= 0 for v in trained_versions), "every trained token has a version"
        assert r.metrics["infra_errors"] == 0
        assert "engine_idle" in r.metrics
        assert "mismatch/kl" in r.metrics

    spans = span_exporter.get_finished_spans()
    (run,) = [s for s in spans if s.name == sc.SPAN_TRAIN_RUN]
    same = [s for s in spans if s.context.trace_id == run.context.trace_id]
    names = {s.name for s in same}
    for kind in (sc.SPAN_ROLLOUT, sc.SPAN_TRAIN_STEP, sc.SPAN_ACTION, sc.SPAN_TRAIN_UPDATE):
        assert kind in names, (kind, sorted(names))
    for s in same:
        if s.name in (sc.SPAN_ROLLOUT, sc.SPAN_TRAIN_STEP):
            assert sc.POLICY_VERSION in s.attributes
    # the overlap: the rollouts of step 1 were launched before step 0's update ended
    (update0,) = [
        s for s in same if s.name == sc.SPAN_TRAIN_UPDATE and s.attributes[sc.STEP_ID] == 0
    ]
    early = [
        s
        for s in same
        if s.name == sc.SPAN_ROLLOUT
        and s.attributes[sc.STEP_ID] == 1
        and s.start_time < update0.end_time
    ]
    assert early, "with max_staleness 1 the next step's rollouts start during the update"


def test_a_killed_rollout_engine_is_reported_not_lost(
    tiny_model_dir: Path, tmp_path: Path, ray_session
) -> None:
    """The vLLM engine-core process dies after the first step: the run stops with an error
    that names every group it did not train on; the finished step's metrics are on disk."""
    import threading
    import time

    import psutil

    from r1_train.async_trainer import RolloutsLost

    out = tmp_path / "async"
    cfg = _cfg(
        tiny_model_dir,
        out,
        "run.steps=4",
        "run.mode=async",
        "asynchronous.max_staleness=1",
        "rollout.max_new_tokens=48",
    )
    trainer = Trainer(cfg)
    killed: list[int] = []

    def kill_after_first_step() -> None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                for child in psutil.Process().children(recursive=True):
                    try:  # an earlier test may have left a zombie child: skip it
                        if "EngineCore" in " ".join(child.cmdline()):
                            child.kill()
                            killed.append(child.pid)
                    except psutil.Error:
                        continue
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    try:
        with pytest.raises(RolloutsLost, match="Not trained on") as err:
            asyncio.run(trainer.train())
    finally:
        killer.join(timeout=5)
        trainer.close()
    assert killed, "the engine core process was not found"
    lost = err.value
    # what the next steps would have used: the engine died with groups of step >= 1 launched
    assert lost.in_flight + len(lost.ready) + len(lost.failed) >= 1
    assert all(step >= 1 for step, _ in lost.failed)
    assert all(f"step {s} prompt {p}" in str(lost) for s, p in lost.failed)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(rows) < 4
