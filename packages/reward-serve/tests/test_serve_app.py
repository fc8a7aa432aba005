"""Reward deployments on a real local Ray Serve: handles, HTTP, batching, multiplexing, errors."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_instance(ray_session):
    from ray import serve

    serve.shutdown()  # an earlier module's Serve would keep its own HTTP proxy
    serve.start(proxy_location="Disabled")  # HTTP goes through tangram_reward.gateway
    yield serve
    serve.shutdown()


@pytest.fixture(scope="module")
def rules(serve_instance):
    """The rule verifier's handle, and the URL of a gateway in front of it."""
    from tangram_reward.gateway import RewardGateway, run_in_thread
    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    serve = serve_instance
    cfg = RewardDeploymentConfig(
        name="rules", kind="rules", num_cpus=0.5, max_batch_size=16, batch_wait_timeout_s=0.05
    )
    handle = serve.run(build_app(cfg), name="rules", route_prefix=None)
    with run_in_thread(RewardGateway([(cfg, handle)])) as url:
        yield handle, url


def test_rule_scores_through_a_handle(rules):
    handle, _ = rules
    good = {
        "response": "<think>2+2</think><answer>4</answer>",
        "reference": "4",
        "rules": ["math", "format"],
    }
    out = handle.score.remote(good).result()
    meta = out.pop("meta")
    assert out == {"reward": 2.0, "scores": {"math": 1.0, "format": 1.0}}
    assert meta["batch_size"] >= 1
    assert meta["queue_wait_s"] >= 0
    assert meta["replica"] not in ("", "local")
    wrong = handle.score.remote({**good, "reference": "5"}).result()
    assert wrong["scores"] == {"math": 0.0, "format": 1.0}


def test_a_burst_is_batched(rules):
    handle, _ = rules
    reqs = [{"response": rf"\boxed{{{i}}}", "reference": str(i)} for i in range(48)]

    async def burst() -> list:
        return await asyncio.gather(*[handle.score.remote(r) for r in reqs])

    results = asyncio.run(burst())
    assert [r["reward"] for r in results] == [1.0] * 48
    assert handle.stats.remote().result()["max_batch"] > 1


def test_bad_input_is_a_clear_error(rules):
    handle, url = rules
    with pytest.raises(Exception, match="rule 'math' needs a non-empty 'reference'"):
        handle.score.remote({"response": "42"}).result()
    with pytest.raises(Exception, match="response"):
        handle.score.remote({"response": "", "reference": "1"}).result()
    body = json.dumps({"response": "x", "reference": "1", "colour": "red"}).encode()
    req = urllib.request.Request(f"{url}/rules", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 422
    detail = json.loads(err.value.read())["detail"]
    assert detail[0]["field"] == "colour"
    ok = urllib.request.Request(
        f"{url}/rules",
        method="POST",
        data=json.dumps({"response": "7", "reference": "7"}).encode(),
    )
    assert json.loads(urllib.request.urlopen(ok, timeout=30).read())["reward"] == 1.0


def test_scalar_reward_model_batches_and_multiplexes(serve_instance, tiny_rm_dir, tmp_path):
    import shutil

    from tangram_reward.models import ScalarRewardModel, ScalarRewardModelConfig
    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    serve = serve_instance
    cfg = RewardDeploymentConfig(
        name="rm",
        kind="scalar_rm",
        model_path=str(tiny_rm_dir),
        num_cpus=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
    )
    handle = serve.run(build_app(cfg), name="rm", route_prefix=None)
    pairs = [(f"question {i}", f"answer {i}") for i in range(16)]

    async def burst(model_id=None) -> list:
        return await asyncio.gather(*[handle.score.remote(p, r, model_id) for p, r in pairs])

    served = asyncio.run(burst())
    local = ScalarRewardModel(ScalarRewardModelConfig(path=tiny_rm_dir))
    assert served == pytest.approx(local.score(*zip(*pairs, strict=True)), abs=1e-5)
    assert handle.stats.remote().result()["max_batch"] > 1
    second = tmp_path / "second-head"
    shutil.copytree(tiny_rm_dir, second)  # a second reward head, multiplexed on the same replica
    assert asyncio.run(burst(str(second))) == pytest.approx(served, abs=1e-5)
    with pytest.raises(Exception, match="does not exist"):
        handle.score.remote("p", "r", str(tmp_path / "missing")).result()
    serve.delete("rm")


def test_config_errors_name_the_fix():
    from pydantic import ValidationError

    from tangram_reward.serve_app import RewardDeploymentConfig

    with pytest.raises(ValidationError, match="needs model_path"):
        RewardDeploymentConfig(name="x", kind="scalar_rm")
    with pytest.raises(
        ValidationError, match=r"max_ongoing_requests \(4\) must be >= max_batch_size \(8\)"
    ):
        RewardDeploymentConfig(name="x", kind="rules", max_batch_size=8, max_ongoing_requests=4)


def test_external_scaling_up_and_down(serve_instance):
    from tangram_reward.serve_app import RewardDeploymentConfig, build_app
    from tangram_reward.serve_control import (
        running_replicas,
        scale_deployment,
        wait_for_replicas,
    )

    serve = serve_instance
    cfg = RewardDeploymentConfig(name="scaled", kind="rules", num_cpus=0.25)
    handle = serve.run(
        build_app(cfg), name="scaled", route_prefix=None, external_scaler_enabled=True
    )
    assert running_replicas("scaled", "scaled") == 1
    scale_deployment("scaled", "scaled", 2)
    took = asyncio.run(wait_for_replicas("scaled", "scaled", 2, timeout_s=60))
    assert took >= 0
    pids = {handle.pid.remote().result() for _ in range(40)}
    assert len(pids) == 2  # both replicas serve
    scale_deployment("scaled", "scaled", 1)
    asyncio.run(wait_for_replicas("scaled", "scaled", 1, timeout_s=60))
    assert handle.score.remote({"response": "1", "reference": "1"}).result()["reward"] == 1.0
    serve.delete("scaled")


def test_scaling_refused_without_external_scaler(rules):
    from tangram_reward.serve_control import scale_deployment

    with pytest.raises(Exception, match="external_scaler_enabled"):
        scale_deployment("rules", "rules", 2)
