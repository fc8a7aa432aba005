"""r1-train on a two-node Ray cluster, run as a user runs it: ``r1-train run ... cluster.*``.

One local cluster for the module (``ray.cluster_utils.Cluster``: a head and a second node, told
apart by custom resources); every run is the real CLI in a subprocess that joins it through
``RAY_ADDRESS``, with real trainer ranks (FSDP2 over gloo), real vLLM engines, rewards on Ray
Serve and console-exported spans from every process.

* the cluster step equals the one-process step (loss per step, the weights after two steps);
  the actors sit on the nodes the split layout promises; every actor's span is in its step's
  trace;
* a rollout engine killed with SIGKILL: its groups go to the other engine, nothing is lost;
  the last one killed: a clear error, the checkpoints intact;
* a trainer rank killed: an error naming the rank and its node; the run resumes on one rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from r1_train.reaper import _table as reaper_table
from r1_train.reaper import descendants

pytestmark = pytest.mark.slow

SPAN_STEP = "tangram.train.step"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    marker = Path("/tmp/ray/ray_current_cluster")
    before = marker.read_text() if marker.is_file() else None
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"node_a": 8}})
    c.add_node(num_cpus=4, resources={"node_b": 8})
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()
        # Cluster leaves its address as "the current cluster": a later plain ray.init() in this
        # session would try to join the dead one
        if before is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(before)


def _overrides(model: Path, rm: Path | None, out: Path, steps: int) -> list[str]:
    """The run: with ``rm``, a reward model scores (rewards differ within a group, so the
    update is not zero); without, the math rule (cheaper; any completion can be scored)."""
    rewards = ["rewards.weights={rm: 1.0}", f"rewards.rm_path={rm}"] if rm else []
    return [
        *rewards,
        f"model.path={model}",
        "model.dtype=float32",
        "rollout.group_size=2",
        "rollout.max_new_tokens=16",
        "rollout.max_total_tokens=128",
        "task.size=16",
        "optim.lr=0.01",
        "optim.micro_batch_size=2",
        "optim.grad_clip=1000000",
        # AdamW's first step is about lr * sign(g): a gradient near 0 takes its sign from float
        # rounding, which differs between a sharded all-reduce and one process. eps 1 makes the
        # step lr * g / (|g| + 1), smooth in g, so the comparison checks the gradients.
        "optim.adam_epsilon=1.0",
        f"run.steps={steps}",
        "run.prompts_per_step=4",
        "run.progress=false",
        "run.tensorboard=false",
        "run.save_every=1",
        f"run.out_dir={out}",
    ]


def _cluster(ranks: int, engines: int) -> list[str]:
    return [
        "cluster.address=auto",
        f"cluster.trainer.ranks={ranks}",
        f"cluster.rollout.engines={engines}",
        "cluster.trainer.num_cpus=1",
        "cluster.rollout.num_cpus=1",
    ]


def _start(cluster: Any, overrides: list[str], **env: str) -> subprocess.Popen[str]:
    full = dict(os.environ, RAY_ADDRESS=cluster.address, HF_HUB_OFFLINE="1", **env)
    full.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "r1_train", "run", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end in {timeout} s: {err[-3000:]}") from None
    return proc.returncode, out, err


def _rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(check: Any, proc: subprocess.Popen[str], timeout: float = 400) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


LEFT = """
import json, ray
from ray.util.state import list_actors, list_placement_groups
ray.init(address={address!r}, log_to_driver=False)
actors = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])
          if a.class_name in ("TrainerRank", "EngineWorker")]
groups = [g.name for g in list_placement_groups(filters=[("state", "=", "CREATED")])
          if g.name.startswith("r1-train-")]
print(json.dumps({{"actors": actors, "placement_groups": groups}}))
"""


def _left_on(cluster: Any) -> dict[str, list[str]]:
    """The run's actors and placement groups still alive on the cluster (asked from another
    process: this one may hold the session's own Ray)."""
    code = LEFT.format(address=cluster.address)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    return json.loads(got.stdout.strip().splitlines()[-1])


def _spans(text: str) -> list[dict[str, Any]]:
    """Every span the console exporter printed in ``text`` (pretty JSON, one per span)."""
    decoder = json.JSONDecoder()
    out, at = [], 0
    while (at := text.find('{\n    "name": ', at)) != -1:
        try:
            span, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        out.append(span)
        at = end
    return out


def _worker_spans(cluster: Any) -> list[dict[str, Any]]:
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
    return [s for f in sorted(logs.glob("worker-*.out")) for s in _spans(f.read_text())]


def test_cluster_step_equals_the_one_process_step_and_traces_every_node(
    cluster: Any, tiny_model_dir: Path, tiny_rm_dir: Path, tmp_path: Path
) -> None:
    # every trajectory calls the tool once: the sandbox pool runs on the cluster in the second run
    tools = ["agent.max_turns=2", "agent.prefill='<code>print(6 * 7)</code>'"]
    tools.append("rollout.max_total_tokens=256")  # the tool instructions lengthen the prompt
    one = _start(cluster, [*_overrides(tiny_model_dir, tiny_rm_dir, tmp_path / "one", 2), *tools])
    rc, _, err = _finish(one)
    assert rc == 0, err[-3000:]
    two = _start(
        cluster,
        [*_overrides(tiny_model_dir, tiny_rm_dir, tmp_path / "two", 2), *tools, *_cluster(2, 2)],
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
    )
    rc, out, err = _finish(two)
    assert rc == 0, err[-3000:]

    # the split layout: both ranks on one node, both engines on the other
    layout = json.loads((tmp_path / "two" / "cluster.json").read_text())
    assert layout["split"] is True
    trainer_nodes = {p["node_id"] for p in layout["trainer"]}
    engine_nodes = {p["node_id"] for p in layout["rollout"]}
    assert len(layout["trainer"]) == 2
    assert len(layout["rollout"]) == 2
    assert len(trainer_nodes) == 1
    assert len(engine_nodes) == 1
    assert trainer_nodes.isdisjoint(engine_nodes)
    # the sandbox pool ran in a Ray actor on one of the cluster's nodes
    assert layout["services"]["sandbox"] in trainer_nodes | engine_nodes

    # same samples, same loss, same weights: the data-parallel step is the one-process step
    rows_one, rows_two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [0, 1]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["samples"] == a["samples"] == 8
        assert b["tool_calls"] == a["tool_calls"] >= 8
        assert b["response_tokens_mean"] == a["response_tokens_mean"]
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-5)
        # the update is real: GRPO's loss is about 0 on-policy (advantages sum to 0 in a group),
        # its gradient is not
        assert a["grad_norm"] > 0.1
        # the sum of two ranks' partial losses over the global counts: float reordering only
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["trainer_ranks"] == 2
        assert b["engines_alive"] == 2
        assert b["dispatch_balance"] == 1.0  # 4 groups over 2 engines: 2 and 2
    w_one = load_file(str(tmp_path / "one" / "checkpoint-000002" / "model.safetensors"))
    w_two = load_file(str(tmp_path / "two" / "checkpoint-000002" / "model.safetensors"))
    w_init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(w_one) == set(w_two)
    for name, tensor in w_one.items():
        assert torch.allclose(w_two[name], tensor, atol=1e-5, rtol=1e-4), name
    moved = [n for n in w_one if not torch.equal(w_one[n], w_init[n])]
    assert len(moved) > len(w_one) // 2, "the two steps must have moved the weights"

    # one trace per step, with spans from the driver, both ranks and both engines
    driver = _spans(out)
    steps = {s["context"]["trace_id"]: s for s in driver if s["name"] == SPAN_STEP}
    assert len(steps) == 2
    remote = [s for s in _worker_spans(cluster) if s["context"]["trace_id"] in steps]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in remote:
        by_name.setdefault(s["name"], []).append(s)
    updates = by_name.get("tangram.train.update.rank", [])
    generates = by_name.get("tangram.rollout.engine.generate", [])
    syncs = by_name.get("tangram.rollout.engine.weight_sync", [])
    assert {s["attributes"]["tangram.trainer.rank"] for s in updates} == {0, 1}
    assert {s["attributes"]["tangram.rollout.engine"] for s in generates} == {0, 1}
    assert syncs
    span_nodes = {s["attributes"]["tangram.node.id"] for s in updates + generates}
    assert span_nodes == trainer_nodes | engine_nodes  # spans from both nodes, in one trace
    for trace_id in steps:
        kinds = {s["name"] for s in remote if s["context"]["trace_id"] == trace_id}
        assert {"tangram.train.update.rank", "tangram.rollout.engine.generate"} <= kinds


def test_engines_killed_the_groups_move_then_the_run_stops_clearly(
    cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, None, run, 8)
    overrides = [o for o in overrides if not o.startswith("rollout.max_new_tokens")]
    proc = _start(cluster, [*overrides, "rollout.max_new_tokens=48", *_cluster(1, 2)])
    try:
        layout = _wait_for(
            lambda: (
                (run / "cluster.json").is_file() and json.loads((run / "cluster.json").read_text())
            ),
            proc,
        )
        pids = [p["pid"] for p in layout["rollout"]]
        table = reaper_table()
        engine_children = set().union(*(descendants(pid, table) for pid in pids))
        assert engine_children, "each engine actor runs vLLM's EngineCore below it"
        _wait_for(lambda: len(_rows(run)) >= 1, proc)
        os.kill(pids[1], signal.SIGKILL)
        _wait_for(lambda: any(r.get("engines_lost") for r in _rows(run)), proc)
        done = len(_rows(run))
        _wait_for(lambda: len(_rows(run)) > done, proc)  # a whole step on the survivor
        os.kill(pids[0], signal.SIGKILL)
        rc, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = _rows(run)
    assert rc == 1, err[-3000:]
    assert "every rollout engine is gone" in err
    assert "engine 0 on node" in err
    assert "engine 1 on node" in err
    assert "Traceback" not in err
    # every completed step trained on all its groups, the failover ones included
    assert sum(r["engines_lost"] for r in rows) == 1
    for r in rows:
        assert r["samples"] == 8, r
        assert r["infra_dropped"] == 0, r
    assert rows[-1]["engines_alive"] == 1
    # the checkpoint of the last completed step is whole and loadable
    last = run / f"checkpoint-{len(rows):06d}"
    assert json.loads((last / "state.json").read_text())["next_step"] == len(rows)
    assert load_file(str(last / "model.safetensors"))
    assert torch.load(last / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    # nothing of the run stays: no actor, no placement group, no vLLM process below an engine
    assert _left_on(cluster) == {"actors": [], "placement_groups": []}
    deadline = time.monotonic() + 15
    while (alive := engine_children & set(reaper_table())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"vLLM processes of the killed engines still run: {sorted(alive)}"


def test_a_dead_trainer_rank_is_named_and_the_run_resumes_on_one_rank(
    cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, None, run, 4)
    proc = _start(cluster, [*overrides, *_cluster(2, 1)])
    try:
        layout = _wait_for(
            lambda: (
                (run / "cluster.json").is_file() and json.loads((run / "cluster.json").read_text())
            ),
            proc,
        )
        _wait_for(lambda: (run / "checkpoint-000001").is_dir(), proc)
        os.kill(layout["trainer"][1]["pid"], signal.SIGKILL)
        rc, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1, err[-3000:]
    node = layout["trainer"][1]["node_id"][:12]
    assert f"trainer rank 1 on node {node}" in err, err[-2000:]
    assert "resume with run.resume=true" in err
    trained = len(_rows(run))
    assert 1 <= trained < 4

    resumed = _start(cluster, [*overrides, *_cluster(1, 1), "run.resume=true"])
    rc, _, err = _finish(resumed)
    assert rc == 0, err[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["trainer_ranks"] == 1
    assert (run / "checkpoint-000004" / "model.safetensors").is_file()
    assert _left_on(cluster) == {"actors": [], "placement_groups": []}


def test_async_mode_runs_on_the_cluster_within_the_staleness_bound(
    cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = [o for o in _overrides(tiny_model_dir, None, run, 4) if "save_every" not in o]
    async_mode = ["run.mode=async", "asynchronous.max_staleness=1", "run.save_every=0"]
    proc = _start(cluster, [*overrides, *async_mode, *_cluster(1, 2)])
    rc, _, err = _finish(proc)
    assert rc == 0, err[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["samples"] == 8, r
        assert r["staleness_max"] <= 1, r  # the bound holds across both engines
        assert r["engines_alive"] == 2, r
    # both engines generated: groups were spread over them
    assert {r["dispatch_balance"] for r in rows} != {None}
    assert (run / "checkpoint-000004" / "model.safetensors").is_file()
