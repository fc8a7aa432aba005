"""Reward-serve's HTTP gateway is safe by default, on a real local Ray Serve over loopback.

The gateway (:mod:`tangram_reward.gateway`) runs on uvicorn in this process and forwards to
the deployments through Serve handles; Serve's own HTTP proxy is off. Deployments, each with
the limits its tests need: ``guarded`` (a token, generous rates; 401,
413, 422 and the fuzz), ``tight`` (one request per client at a time, one per second),
``bounded`` (a small Serve queue: 503 at once past it) and ``rm`` (a tiny scalar reward model;
its fuzz and attribution). Per-client limits key on the peer address, so tests that need a
fresh client send from their own loopback address (127.0.0.x).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangram_core.http.guard import GuardConfig, auth_headers
from tangram_core.testing import hostile_json_bodies, nested_json

pytestmark = pytest.mark.slow

TOKEN = "reward-test-token-0123456789abcdef"
AUTH = auth_headers(TOKEN)
MAX_BODY = 64 << 10
FAST = {"client_rate": 1e6, "client_burst": 1_000_000, "client_concurrency": 256}
FUZZ_EXAMPLES = 1000


@pytest.fixture(scope="module")
def apps(ray_session: Any, tiny_rm_dir: Any) -> Any:
    from ray import serve

    from tangram_reward.gateway import RewardGateway, run_in_thread
    from tangram_reward.serve_app import RewardDeploymentConfig, build_app

    serve.shutdown()  # an earlier module's Serve would keep its own HTTP proxy
    serve.start(proxy_location="Disabled")
    configs = [
        RewardDeploymentConfig(
            name="guarded",
            kind="rules",
            num_cpus=0.25,
            http=GuardConfig(max_body_bytes=MAX_BODY, **FAST),
        ),
        RewardDeploymentConfig(
            name="tight",
            kind="rules",
            num_cpus=0.25,
            max_batch_size=2,
            max_ongoing_requests=4,
            batch_wait_timeout_s=1.0,
            http=GuardConfig(client_concurrency=1, client_rate=0.1, client_burst=2),
        ),
        RewardDeploymentConfig(
            name="bounded",
            kind="rules",
            num_cpus=0.25,
            max_batch_size=2,
            max_ongoing_requests=2,
            max_queued_requests=2,
            batch_wait_timeout_s=0.2,
            http=GuardConfig(**FAST),
        ),
        RewardDeploymentConfig(
            name="rm",
            kind="scalar_rm",
            model_path=str(tiny_rm_dir),
            num_cpus=0.25,
            max_batch_size=8,
            http=GuardConfig(max_body_bytes=MAX_BODY, **FAST),
        ),
    ]
    handles = {
        cfg.name: serve.run(build_app(cfg), name=cfg.name, route_prefix=None) for cfg in configs
    }
    gateway = RewardGateway([(cfg, handles[cfg.name]) for cfg in configs], token=TOKEN)
    with run_in_thread(gateway) as url:
        yield url, handles, gateway
    serve.shutdown()


def client(source: str = "127.0.0.1", timeout: float = 60.0) -> httpx.Client:
    """A client from ``source`` (its own loopback address: its own per-client limits)."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(transport=transport, timeout=timeout, headers=AUTH)


GOOD = {"response": "<think>x</think><answer>4</answer>", "reference": "4"}


def test_missing_or_wrong_token_gets_401_and_no_work(apps: Any) -> None:
    url, handles, _ = apps
    before = handles["guarded"].stats.remote().result()["batches"]
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-000000000000"},
        {"Authorization": TOKEN},
    ):
        resp = httpx.post(url + "/guarded", json=GOOD, headers=headers, timeout=30)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"].startswith("Bearer")
        detail = resp.json()["detail"]
        assert detail == "invalid bearer token" or "missing bearer token" in detail
    assert handles["guarded"].stats.remote().result()["batches"] == before  # nothing scored
    with client() as c:
        assert c.post(url + "/guarded", json=GOOD).json()["reward"] == 1.0


def test_oversized_body_gets_413(apps: Any) -> None:
    url, _, _ = apps
    with client() as c:
        resp = c.post(url + "/guarded", json={**GOOD, "response": "x" * (MAX_BODY + 1)})
    assert resp.status_code == 413
    assert f"max_body_bytes={MAX_BODY}" in resp.json()["detail"]


def test_bad_payloads_get_422_naming_the_field_or_400(apps: Any) -> None:
    url, _, _ = apps
    cases = [
        ("/guarded", {**GOOD, "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ("/guarded", {**GOOD, "rules": ["astrology"]}, "rules.0", "Input should be"),
        ("/guarded", {"response": "4"}, "", "needs a non-empty 'reference'"),
        ("/guarded", {**GOOD, "weights": {"math": "heavy"}}, "weights.math", "valid number"),
        ("/rm", {"prompt": "p", "response": ""}, "response", "at least 1 character"),
        ("/rm", {"prompt": 3, "response": "r"}, "prompt", "valid string"),
        (
            "/rm",
            {"prompt": "p", "response": "r", "model_id": "/nowhere/rm"},
            "",
            "deployment 'rm': reward model path '/nowhere/rm' does not exist",
        ),
        ("/guarded", [1, 2], "", "must be a JSON object"),
    ]
    with client() as c:
        for route, body, name, rule in cases:
            resp = c.post(url + route, json=body)
            assert resp.status_code == 422, (body, resp.text)
            detail = resp.json()["detail"]
            assert any(d["field"] == name and rule in d["error"] for d in detail), detail
        bad = c.post(
            url + "/guarded",
            content=b'{"response": "\xff',
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400
        assert "not valid JSON" in bad.json()["detail"]
        assert c.get(url + "/guarded").status_code == 405


def test_rate_over_the_client_limit_gets_429(apps: Any) -> None:
    url, _, _ = apps
    with client("127.0.0.2") as c:
        responses = [c.post(url + "/tight", json=GOOD) for _ in range(4)]
    statuses = [r.status_code for r in responses]
    assert statuses[0] == 200
    limited = [r for r in responses if r.status_code == 429]
    assert limited, statuses
    for r in limited:
        assert int(r.headers["retry-after"]) >= 1
        assert "rate limit exceeded for 127.0.0.2" in r.json()["detail"]


def _concurrently(jobs: list[tuple[str, str, dict[str, Any]]], spacing: float = 0.0) -> list[Any]:
    out: list[Any] = [None] * len(jobs)

    def one(i: int, source: str, url: str, body: dict[str, Any]) -> None:
        with client(source) as c:
            try:
                out[i] = c.post(url, json=body)
            except httpx.HTTPError as exc:
                out[i] = exc

    threads = []
    for i, job in enumerate(jobs):
        t = threading.Thread(target=one, args=(i, *job))
        t.start()
        threads.append(t)
        time.sleep(spacing)
    for t in threads:
        t.join(90)
    return out


def test_concurrent_requests_over_the_client_limit_get_429(apps: Any) -> None:
    url, _, gateway = apps
    box: dict[str, Any] = {}

    def first() -> None:
        with client("127.0.0.3") as c:
            box["first"] = c.post(url + "/tight", json=GOOD)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 30
    while gateway.stats("tight").in_flight == 0:
        assert time.monotonic() < deadline, "the first request never arrived"
        time.sleep(0.01)
    with client("127.0.0.3") as c:
        second = c.post(url + "/tight", json=GOOD)
    thread.join(60)
    assert box["first"].status_code == 200  # rides a batch that waits 1 s for a partner
    assert second.status_code == 429
    assert "too many concurrent requests from 127.0.0.3" in second.json()["detail"]


def test_past_the_bounded_queue_the_gateway_answers_503_at_once(apps: Any) -> None:
    url, _, _ = apps
    jobs = [(f"127.0.1.{i}", url + "/bounded", GOOD) for i in range(12)]
    responses = _concurrently(jobs)
    statuses = [getattr(r, "status_code", type(r).__name__) for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    assert 503 in statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert "'bounded' is at capacity (max_queued_requests=2 waiting)" in rejected.text


def test_rewards_are_attributable_over_http_and_handles(apps: Any, tiny_rm_dir: Any) -> None:
    from tangram_reward.serve_app import RULES_VERSION, checkpoint_version
    from tangram_reward.tracing import AttributedReward

    url, handles, _ = apps
    with client() as c:
        resp = c.post(url + "/guarded", json=GOOD, headers={"X-Request-ID": "req-abc-123"})
        meta = resp.json()["meta"]
        assert meta["deployment"] == "guarded"
        assert meta["model_version"] == RULES_VERSION
        assert meta["request_id"] == "req-abc-123"
        rm = c.post(url + "/rm", json={"prompt": "p", "response": "r"}).json()
    assert isinstance(rm["reward"], float)
    assert rm["meta"]["deployment"] == "rm"
    assert rm["meta"]["model_version"].startswith("tiny-rm@")
    by_handle = handles["guarded"].score.remote(GOOD).result()["meta"]
    assert by_handle["deployment"] == "guarded"
    assert by_handle["request_id"]
    scalar = handles["rm"].score.remote("p", "r").result()
    assert isinstance(scalar, AttributedReward)
    assert scalar == pytest.approx(rm["reward"], abs=1e-5)  # still a float to its callers
    assert scalar.meta["model_version"] == rm["meta"]["model_version"]
    assert scalar.meta["request_id"] != rm["meta"]["request_id"]
    assert checkpoint_version(str(tiny_rm_dir)) == scalar.meta["model_version"]


def test_attribution_appears_on_the_callers_span(apps: Any, span_exporter: Any) -> None:
    from tangram_core import semconv
    from tangram_core.actions import Action
    from tangram_core.orchestrator import Orchestrator
    from tangram_reward.manager import RewardManager, RewardManagerConfig

    async def main() -> Any:
        manager = RewardManager(RewardManagerConfig(app="guarded"))
        async with Orchestrator([manager]) as orch:
            action = Action(kind="reward.rules", demand={"reward": 1}, payload={"request": GOOD})
            return await orch.submit(action)

    result = asyncio.run(main())
    meta = result.output["meta"]
    spans = [
        s
        for s in span_exporter.get_finished_spans()
        if (s.attributes or {}).get(semconv.REWARD_REQUEST_ID) == meta["request_id"]
    ]
    assert spans, "no span of the caller carries the reward's request id"
    attrs = spans[0].attributes
    assert attrs[semconv.REWARD_DEPLOYMENT] == "guarded"
    assert attrs[semconv.REWARD_MODEL_VERSION] == meta["model_version"]


def test_health_needs_no_token_and_unknown_routes_say_nothing_without_one(apps: Any) -> None:
    url, _, _ = apps
    health = httpx.get(url + "/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json()["deployments"] == ["bounded", "guarded", "rm", "tight"]
    assert httpx.post(url + "/nowhere", json=GOOD, timeout=30).status_code == 401
    with client() as c:
        missing = c.post(url + "/nowhere", json=GOOD)
    assert missing.status_code == 404
    assert "no deployment at /nowhere; /bounded, /guarded, /rm, /tight" in missing.json()["detail"]


def test_a_request_past_its_deadline_gets_504_and_leaves_the_replica(apps: Any) -> None:
    """``tight`` waits 1 s for a batch partner; a gateway with a 0.3 s deadline gives up on it
    with 504 and cancels it, and the deployment still answers afterwards."""
    from tangram_reward.gateway import RewardGateway, run_in_thread

    url, _, gateway = apps
    impatient = RewardGateway([gateway.deployment("tight")], token=TOKEN, request_timeout_s=0.3)
    with run_in_thread(impatient) as fast_url, client("127.0.0.4") as c:
        t0 = time.monotonic()
        resp = c.post(fast_url + "/tight", json=GOOD)
        waited = time.monotonic() - t0
    assert resp.status_code == 504
    assert "no reward from 'tight' within request_timeout_s=0.3" in resp.json()["detail"]
    assert waited < 1.0  # answered at the deadline, not when the batch would have run
    with client("127.0.0.5") as c:
        assert c.post(url + "/tight", json=GOOD).json()["reward"] == 1.0


def test_a_client_that_leaves_frees_its_slot(apps: Any) -> None:
    """``tight`` takes 1 s per lone request; a client that gives up after 0.3 s is counted as
    gone and its slot is free again, and nothing is answered to nobody."""
    url, _, gateway = apps
    stats = gateway.stats("tight")
    before = stats.disconnected
    with client("127.0.0.6", timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(url + "/tight", json=GOOD)
    deadline = time.monotonic() + 10
    while stats.disconnected == before or stats.in_flight:
        assert time.monotonic() < deadline, stats.as_dict()
        time.sleep(0.02)
    assert stats.disconnected == before + 1


# --- fuzz ------------------------------------------------------------------------------------

not_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
VALID = {"/guarded": GOOD, "/rm": {"prompt": "p", "response": "r"}}
BAD_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/guarded": {
        "response": st.one_of(not_str, st.none(), st.just("")),
        "reference": st.one_of(not_str, st.just(""), st.just("   ")),
        "rules": st.one_of(
            st.just([]),
            st.lists(st.sampled_from(["astrology", "MATH", ""]), min_size=1, max_size=3),
            st.integers(),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
        "weights": st.one_of(
            st.fixed_dictionaries({"math": st.text(alphabet="abc", min_size=1, max_size=4)}),
            st.fixed_dictionaries({"sorcery": st.floats(allow_nan=False)}),
            st.lists(st.integers(), max_size=2),
            st.integers(),
        ),
        "think_prefilled": st.one_of(st.lists(st.integers(), max_size=2), st.just("maybe")),
        "language": not_str,
    },
    "/rm": {
        "prompt": st.one_of(not_str, st.none()),
        "response": st.one_of(not_str, st.none(), st.just("")),
        "model_id": not_str,
    },
}


def hostile_bodies(route: str) -> st.SearchStrategy[bytes]:
    """Request bodies that must all be refused (4xx): malformed, mistyped or hostile."""
    valid = VALID[route]
    return hostile_json_bodies(
        valid,
        BAD_FIELDS[route],
        missing={k: v for k, v in valid.items() if k != "response"},
        huge=st.integers(MAX_BODY + 1, 2 * MAX_BODY).map(
            lambda n: json.dumps({**valid, "response": "x" * n}).encode()
        ),
        deep=st.integers(50, 30_000).map(
            lambda d: (json.dumps(valid)[:-1] + f', "response": {nested_json(d)}}}').encode()
        ),
        utf8_field="response",
    )


@pytest.mark.parametrize("route", sorted(VALID))
def test_fuzzed_hostile_bodies_get_4xx_never_5xx(apps: Any, route: str) -> None:
    url, _, gateway = apps
    seen: list[int] = []
    with client(timeout=60) as c:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=hostile_bodies(route))
        def fuzz(body: bytes) -> None:
            resp = c.post(url + route, content=body, headers={"content-type": "application/json"})
            seen.append(resp.status_code)
            assert 400 <= resp.status_code < 500, (body[:200], resp.status_code, resp.text[:300])

        fuzz()
        assert len(seen) >= FUZZ_EXAMPLES
        assert {400, 413, 422} <= set(seen)  # parse errors, size and validation all reached
        ok = c.post(url + route, json=VALID[route])  # still answers a valid request
        assert ok.status_code == 200, ok.text
    counters = gateway.stats(route.strip("/")).as_dict()
    assert not any(code.startswith("5") for code in counters["responses"]), counters


def test_bounded_overload_every_request_ends_and_the_server_recovers(apps: Any) -> None:
    """Clients far past capacity for a few seconds: each request gets a result, 429 or 503
    (never a hang or another 5xx), and afterwards the deployment answers normally."""
    url, _, _ = apps
    stop_at = time.monotonic() + 3.0

    async def hammer() -> list[int | str]:
        results: list[int | str] = []
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as ac:

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    try:
                        resp = await ac.post(url + "/bounded", json=GOOD)
                        results.append(resp.status_code)
                    except httpx.HTTPError as exc:
                        results.append(type(exc).__name__)

            await asyncio.gather(*[worker() for _ in range(16)])
        return results

    results = asyncio.run(hammer())
    assert set(results) <= {200, 429, 503}, sorted({str(r) for r in results})
    assert 200 in results
    assert 503 in results
    with client() as c:
        assert c.post(url + "/bounded", json=GOOD).json()["reward"] == 1.0


def test_cli_refuses_a_public_address_without_a_token(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tangram_reward.cli import main

    monkeypatch.delenv("TANGRAM_API_TOKEN", raising=False)
    monkeypatch.delenv("TANGRAM_API_TOKEN_FILE", raising=False)
    path = tmp_path / "rewards.yaml"
    path.write_text("http_host: 0.0.0.0\ndeployments:\n  - {name: rules, kind: rules}\n")
    assert main(["serve", str(path)]) == 2  # before Ray starts
    err = capsys.readouterr().err
    assert "refusing to start tangram-reward on 0.0.0.0" in err
    assert "TANGRAM_API_TOKEN" in err
    monkeypatch.setenv("TANGRAM_API_TOKEN", "short")
    assert main(["serve", str(path)]) == 2
    assert "use at least 16" in capsys.readouterr().err
