"""The sandbox server is safe by default: tested over real loopback sockets on a real pool.

One pool serves several uvicorn servers in one event loop (a thread), each with the limits
its tests need: ``open`` (generous rates; fuzz, 401/413/422, clamps), ``tight`` (one slot,
a queue of one, one request per client at a time), ``overload`` (a short bounded overload)
and ``drain`` (shut down mid-request). Per-client limits key on the peer address, so tests
that need a fresh client send from their own loopback address (127.0.0.x).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangram_core.http.guard import GuardConfig, GuardStats, auth_headers
from tangram_core.testing import hostile_json_bodies, nested_json
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import Limits
from tangram_sandbox.pool import SandboxPool
from tangram_sandbox.server import ApiLimits, build_app

pytestmark = pytest.mark.usefixtures("can_sandbox")

TOKEN = "sandbox-test-token-0123456789abcdef"
AUTH = auth_headers(TOKEN)
MAX_BODY = 256 << 10
API = ApiLimits(max_code_chars=20_000, max_tests=50, max_output_bytes=1000)
FAST = {"client_rate": 1e6, "client_burst": 1_000_000, "client_concurrency": 256}
GUARDS = {
    "open": GuardConfig(max_body_bytes=MAX_BODY, **FAST),
    "tight": GuardConfig(
        max_in_flight=1,
        max_queue=1,
        queue_timeout_s=20,
        client_concurrency=1,
        client_rate=1.0,
        client_burst=2,
    ),
    "overload": GuardConfig(max_in_flight=2, max_queue=4, queue_timeout_s=2.0, **FAST),
    "drain": GuardConfig(**FAST),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Servers:
    urls: dict[str, str] = field(default_factory=dict)
    stats: dict[str, GuardStats] = field(default_factory=dict)
    uvicorn: dict[str, Any] = field(default_factory=dict)
    pool: SandboxPool | None = None


@pytest.fixture(scope="module")
def servers(can_sandbox: None) -> Iterator[Servers]:
    import uvicorn

    out = Servers()
    ready = threading.Event()
    stop: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        config = PoolConfig(
            min_workers=2,
            max_workers=2,
            max_limits=Limits(wall_s=5, memory_mb=1024, processes=64),
        )
        async with SandboxPool(config) as pool:
            out.pool = pool
            for name, guard in GUARDS.items():
                port = _free_port()
                out.stats[name] = GuardStats()
                app = build_app(pool=pool, token=TOKEN, guard=guard, api=API, stats=out.stats[name])
                cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
                out.uvicorn[name] = uvicorn.Server(cfg)
                out.urls[name] = f"http://127.0.0.1:{port}"
            tasks = [asyncio.create_task(s.serve()) for s in out.uvicorn.values()]
            while not all(s.started for s in out.uvicorn.values()):
                await asyncio.sleep(0.02)
            stop["event"] = asyncio.Event()
            stop["loop"] = asyncio.get_running_loop()
            ready.set()
            await stop["event"].wait()
            for s in out.uvicorn.values():
                s.should_exit = True
            await asyncio.gather(*tasks)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by the fixture below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60), "servers did not start"
    if failure:
        raise failure[0]
    yield out
    stop["loop"].call_soon_threadsafe(stop["event"].set)
    thread.join(60)


def client(source: str = "127.0.0.1", timeout: float = 30.0) -> httpx.Client:
    """A client from ``source`` (its own loopback address: its own per-client limits)."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(transport=transport, timeout=timeout, headers=AUTH)


def _slow(seconds: float) -> dict[str, Any]:
    return {"code": f"import time; time.sleep({seconds}); print('done')"}


# --- 401 -------------------------------------------------------------------------------------


def test_missing_or_wrong_token_gets_401_and_no_work(servers: Servers) -> None:
    url = servers.urls["open"]
    stats = servers.stats["open"]
    served = stats.responses[200]
    bodies = {
        "/run": {"code": "print(1)"},
        "/run_tests": {"code": "print(1)", "tests": [{"expected_stdout": "1"}]},
        "/run_code": {"code": "print(1)", "language": "python"},
    }
    for path, body in bodies.items():
        for headers in ({}, {"Authorization": "Bearer not-the-token-0000000000"}, {"X": "y"}):
            resp = httpx.post(url + path, json=body, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, headers)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            detail = resp.json()["detail"]
            assert detail in ("invalid bearer token",) or "missing bearer token" in detail
    assert httpx.get(url + "/capabilities", timeout=10).status_code == 401
    assert stats.responses[200] == served  # nothing ran
    assert httpx.get(url + "/healthz", timeout=10).json()["healthy"] is True  # probes are open


# --- 413 and 422 -----------------------------------------------------------------------------


def test_oversized_body_gets_413_naming_the_limit(servers: Servers) -> None:
    with client() as c:
        resp = c.post(servers.urls["open"] + "/run", json={"code": "x" * (MAX_BODY + 1)})
        assert resp.status_code == 413
        assert f"max_body_bytes={MAX_BODY}" in resp.json()["detail"]
        assert (
            c.post(servers.urls["open"] + "/run", json={"code": "print(7)"}).json()["stdout"]
            == "7\n"
        )


def test_bad_fields_get_422_naming_the_field_and_rule(servers: Servers) -> None:
    url = servers.urls["open"]
    py = {"code": "1", "language": "python"}  # SandboxFusion requires the language
    cases = [
        ("/run", {"code": "1", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ("/run", {"code": 5}, "code", "valid string"),
        ("/run", {"code": "1", "limits": {"wall_s": -1}}, "wall_s", "greater than 0"),
        ("/run", {"code": "1", "limits": {"memory_mb": 8}}, "memory_mb", "greater than or equal"),
        ("/run", {"code": "x" * (API.max_code_chars + 1)}, "code", "max_code_chars=20000"),
        ("/run_code", {**py, "memory_limit_MB": 0}, "memory_limit_MB", "-1"),
        ("/run_code", {**py, "memory_limit_MB": -7}, "memory_limit_MB", "greater than"),
        ("/run_code", {**py, "run_timeout": 0}, "run_timeout", "greater than 0"),
        ("/run_code", {**py, "files": {"../x": "eA=="}}, "files", "'..' component"),
        ("/run_tests", {"code": "1", "tests": []}, "tests", "at least 1"),
        (
            "/run_tests",
            {"code": "1", "tests": [{"expected_stdout": ""}] * (API.max_tests + 1)},
            "tests",
            "max_tests=50",
        ),
    ]
    with client() as c:
        for path, body, name, rule in cases:
            resp = c.post(url + path, json=body)
            assert resp.status_code == 422, (path, body, resp.text)
            errors = resp.json()["detail"]
            assert any(name in e["loc"] for e in errors), (name, errors)
            assert any(rule in e["msg"] for e in errors), (rule, errors)
            assert len(resp.content) < 4096  # inputs are not echoed back


def test_limits_are_clamped_and_output_is_truncated_and_flagged(servers: Servers) -> None:
    with client() as c:
        run = c.post(
            servers.urls["open"] + "/run",
            json={"code": "while True: pass", "limits": {"wall_s": 3600, "memory_mb": 1 << 20}},
        ).json()
        assert run["status"] == "timeout"
        assert run["wall_s"] < 60  # the server's max (5 s), not the 3600 s asked for
        loud = c.post(servers.urls["open"] + "/run", json={"code": "print('x' * 100000)"}).json()
        # The pool stops reading past the cap (the program may then die of a broken pipe).
        assert len(loud["stdout"]) <= API.max_output_bytes
        assert loud["stdout_truncated"] is True
        fusion = c.post(
            servers.urls["open"] + "/run_code",
            json={
                "code": "print('y' * 5000)",
                "language": "python",
                "run_timeout": 1e9,
                "memory_limit_MB": 10**9,
            },
        ).json()
        assert fusion["run_result"]["stdout_truncated"] is True
        assert len(fusion["run_result"]["stdout"]) <= API.max_output_bytes


# --- 429 and 503 -----------------------------------------------------------------------------


def test_rate_over_the_client_limit_gets_429_with_retry_after(servers: Servers) -> None:
    with client("127.0.0.2") as c:
        responses = [c.get(servers.urls["tight"] + "/capabilities") for _ in range(5)]
    statuses = [r.status_code for r in responses]
    assert statuses[:2] == [200, 200]  # the burst
    limited = [r for r in responses if r.status_code == 429]
    assert limited, statuses
    for r in limited:
        assert int(r.headers["retry-after"]) >= 1
        assert "rate limit exceeded for 127.0.0.2" in r.json()["detail"]


class Background:
    """A request posted from its own thread (and its own source address)."""

    def __init__(self, source: str, url: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None

        def post() -> None:
            with client(source) as c:
                self.response = c.post(url, json=body)

        self.thread = threading.Thread(target=post)
        self.thread.start()

    def result(self) -> httpx.Response:
        self.thread.join(60)
        assert self.response is not None
        return self.response


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_concurrent_requests_over_the_client_limit_get_429(servers: Servers) -> None:
    url = servers.urls["tight"] + "/run"
    stats = servers.stats["tight"]
    first = Background("127.0.0.3", url, _slow(1.0))
    _wait_for(lambda: stats.in_flight == 1, "the first request to run")
    with client("127.0.0.3") as c:
        second = c.post(url, json=_slow(0))
    assert second.status_code == 429
    assert "too many concurrent requests from 127.0.0.3" in second.json()["detail"]
    assert second.headers["retry-after"] == "1"
    assert first.result().status_code == 200
    assert first.result().json()["stdout"] == "done\n"


def test_full_queue_gets_503_at_once(servers: Servers) -> None:
    url = servers.urls["tight"] + "/run"
    stats = servers.stats["tight"]
    running = Background("127.0.0.4", url, _slow(1.5))
    _wait_for(lambda: stats.in_flight == 1, "the first request to run")
    queued = Background("127.0.0.5", url, _slow(0))
    _wait_for(lambda: stats.queued == 1, "the second request to queue")
    with client("127.0.0.6") as c:
        rejected = c.post(url, json=_slow(0))
    assert rejected.status_code == 503
    assert "max_queue=1" in rejected.json()["detail"]
    assert rejected.headers["retry-after"] == "1"
    assert running.result().status_code == 200
    assert queued.result().status_code == 200  # the queued request was served once the slot freed


def test_a_client_that_disconnects_frees_its_slot(servers: Servers) -> None:
    url = servers.urls["tight"] + "/run"
    stats = servers.stats["tight"]
    left = stats.disconnected
    with client("127.0.0.7", timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(url, json=_slow(60))
    # The tight server has one slot: this is served only if the abandoned run released it.
    with client("127.0.0.8", timeout=40) as c:
        resp = c.post(url, json={"code": "print('next')"})
    assert resp.status_code == 200
    assert resp.json()["stdout"] == "next\n"
    assert stats.disconnected == left + 1
    # The guard counts a request out after its response is sent, so the client can read the
    # response a moment before (CI saw in_flight 1 there, and 0 an instant later).
    _wait_for(lambda: stats.in_flight == 0, "the served request to be counted out")


# --- fuzz ------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 1000
not_str = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_number = st.one_of(
    st.text(alphabet="abcxyz -", min_size=1, max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.booleans().map(lambda b: [b]),
)
non_positive = st.one_of(st.integers(max_value=0), st.floats(max_value=0, allow_nan=False))
bad_limits = st.one_of(
    not_str.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"wall_s": non_positive}),
    st.fixed_dictionaries({"memory_mb": st.integers(max_value=31)}),
    st.fixed_dictionaries({"processes": st.integers(max_value=0)}),
    st.fixed_dictionaries({"output_bytes": st.integers(max_value=-1)}),
    st.fixed_dictionaries({"memory_mb": st.integers(min_value=(1 << 20) + 1)}),
    st.fixed_dictionaries({"cpu_s": not_number}),
    st.fixed_dictionaries({"nope": st.integers()}),
)
bad_files = st.one_of(
    not_str.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"../../etc/passwd": st.just("eA==")}),
    st.fixed_dictionaries({"/abs": st.just("eA==")}),
    st.fixed_dictionaries({"main.py": st.just("eA==")}),
    st.fixed_dictionaries({"a.txt": st.just("not base64!")}),
    st.fixed_dictionaries({"a.txt": st.integers()}),
)
bad_language = st.one_of(st.sampled_from(["cobol", "Python", "", "python3", "c++", "php"]), not_str)
bad_fetch = st.one_of(
    not_str.filter(lambda v: not isinstance(v, list)),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.just([f"f{i}" for i in range(65)]),
)
bad_test = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"stdin": st.just("1")}),
    st.fixed_dictionaries({"expected_stdout": not_str}),
    st.fixed_dictionaries({"expected_stdout": st.just(""), "extra": st.integers()}),
    st.fixed_dictionaries(
        {"fn": st.sampled_from(["1bad", "a b", "", "x;y"]), "expected": st.none()}
    ),
    not_str.filter(lambda v: not isinstance(v, dict)),
)
bad_tests = st.one_of(
    st.just([]),
    bad_test.map(lambda t: [t]),
    st.just([{"expected_stdout": ""}] * (API.max_tests + 1)),
    not_str.filter(lambda v: not isinstance(v, list)),
)

VALID = {
    "/run": {"code": "print(1)"},
    "/run_tests": {"code": "print(1)", "tests": [{"expected_stdout": "1"}]},
    "/run_code": {"code": "print(1)", "language": "python"},
}
BAD_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/run": {
        "code": st.one_of(not_str, st.none()),
        "language": bad_language,
        "stdin": st.one_of(not_str, st.none()),
        "files": bad_files,
        "fetch_files": bad_fetch,
        "limits": bad_limits,
    },
    "/run_tests": {
        "code": st.one_of(not_str, st.none()),
        "language": bad_language,
        "tests": bad_tests,
        "limits": bad_limits,
        "stop_on_first_failure": st.one_of(st.lists(st.integers(), max_size=2), st.just("maybe")),
        "isolation": st.one_of(st.sampled_from(["none", "BATCH", ""]), not_str),
        "rel_tol": st.one_of(
            st.floats(max_value=-1e-9, allow_nan=False),
            st.floats(min_value=1.001, allow_nan=False, allow_infinity=False),
            not_number,
        ),
    },
    "/run_code": {
        "code": st.one_of(not_str, st.none()),
        "language": bad_language,
        "stdin": not_str,
        "run_timeout": st.one_of(non_positive, not_number),
        "compile_timeout": st.one_of(non_positive, not_number),
        "memory_limit_MB": st.one_of(
            st.integers(max_value=-2), st.just(0), st.just(1.5), not_number
        ),
        "files": bad_files.filter(lambda v: not (isinstance(v, dict) and "main.py" in v)),
        "fetch_files": bad_fetch,
    },
}


def hostile_bodies(path: str) -> st.SearchStrategy[bytes]:
    """Request bodies that must all be refused (4xx): malformed, mistyped or hostile."""
    valid = VALID[path]
    return hostile_json_bodies(
        valid,
        BAD_FIELDS[path],
        missing={k: v for k, v in valid.items() if k not in ("code", "tests")},
        huge=st.integers(API.max_code_chars + 1, 2 * MAX_BODY).map(
            lambda n: json.dumps({**valid, "code": "x" * n}).encode()
        ),
        deep=st.integers(50, 60_000).map(
            lambda d: (
                json.dumps({**valid, "code": "@"})[:-1] + f', "stdin": {nested_json(d)}}}'
            ).encode()
        ),
        utf8_field="code",
        deep_top_max=100_000,
    )


@pytest.mark.parametrize("path", sorted(VALID))
def test_fuzzed_hostile_bodies_get_4xx_never_5xx(servers: Servers, path: str) -> None:
    url = servers.urls["open"] + path
    seen: list[int] = []
    with client(timeout=30) as c:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=hostile_bodies(path))
        def fuzz(body: bytes) -> None:
            resp = c.post(url, content=body, headers={"content-type": "application/json"})
            seen.append(resp.status_code)
            assert 400 <= resp.status_code < 500, (body[:200], resp.status_code, resp.text[:300])

        fuzz()
        assert len(seen) >= FUZZ_EXAMPLES
        assert {400, 413, 422} <= set(seen)  # parse errors, size and validation all reached
        ok = c.post(url, json=VALID[path])  # still answers a valid request
        assert ok.status_code == 200, ok.text
    assert servers.stats["open"].responses.get(500, 0) == 0


# --- overload and shutdown -------------------------------------------------------------------


def test_bounded_overload_every_request_ends_and_latency_recovers(servers: Servers) -> None:
    """Clients far past capacity for a few seconds: each request gets a result, 429 or 503
    (never a hang or a 5xx other than 503), and afterwards the server answers normally."""
    url = servers.urls["overload"] + "/run"
    body = {"code": "import time; time.sleep(0.05); print('ok')"}
    stop_at = time.monotonic() + 3.0

    async def hammer() -> list[int | str]:
        results: list[int | str] = []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=15, headers=AUTH, limits=limits) as ac:

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    try:
                        resp = await ac.post(url, json=body)
                        results.append(resp.status_code)
                    except httpx.HTTPError as exc:
                        results.append(type(exc).__name__)

            await asyncio.gather(*[worker() for _ in range(24)])
        return results

    results = asyncio.run(hammer())
    assert results
    assert set(results) <= {200, 429, 503}, sorted({str(r) for r in results})
    assert 200 in results
    assert 503 in results  # the bounded queue turned excess away instead of growing
    with client() as c:
        resp = c.post(url, json=body)
    assert resp.status_code == 200
    assert resp.json()["stdout"] == "ok\n"
    # the guard's counter drops just after the response is sent: wait for it, bounded
    deadline = time.monotonic() + 10
    while servers.stats["overload"].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers.stats["overload"].in_flight == 0


def test_shutdown_drains_in_flight_work(servers: Servers) -> None:
    url = servers.urls["drain"] + "/run"
    server = servers.uvicorn["drain"]
    box: dict[str, Any] = {}

    def slow() -> None:
        with client() as c:
            box["resp"] = c.post(url, json=_slow(1.0))

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 10
    while servers.stats["drain"].in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.should_exit = True  # what SIGTERM does
    thread.join(30)
    assert box["resp"].status_code == 200
    assert box["resp"].json()["stdout"] == "done\n"
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={"code": "1"}, headers=AUTH, timeout=5)


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_refuses_a_public_address_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from tangram_sandbox.cli import main

    monkeypatch.delenv("TANGRAM_API_TOKEN", raising=False)
    monkeypatch.delenv("TANGRAM_API_TOKEN_FILE", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start tangram-sandbox on 0.0.0.0" in err
    assert "TANGRAM_API_TOKEN" in err
    loose = tmp_path / "token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    assert main(["serve", "--token-file", str(loose), "--port", "1"]) == 2
    assert f"chmod 600 {loose}" in capsys.readouterr().err


def test_cli_server_requires_its_token_and_stops_cleanly(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGRAM_API_TOKEN")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tangram_sandbox.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            "1",
            "--token-file",
            str(token_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the CLI server did not come up"
            time.sleep(0.2)
        assert httpx.post(url + "/run", json={"code": "print(1)"}, timeout=10).status_code == 401
        ok = httpx.post(url + "/run", json={"code": "print(1)"}, headers=AUTH, timeout=30)
        assert ok.json()["stdout"] == "1\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on
