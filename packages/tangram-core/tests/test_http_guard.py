"""The shared HTTP guard: tokens, the loopback policy, per-client limits and the ASGI middleware.

The middleware is driven two ways: directly through the ASGI protocol (fast, exact control of
disconnects and timing), and once over a real loopback socket under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tangram_core.http.guard import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ClientLimiter,
    GuardConfig,
    HttpGuard,
    InsecureBindError,
    TokenError,
    auth_headers,
    check_bind,
    is_loopback,
    load_token,
    new_token_file,
    read_token_file,
    tokens_equal,
)

TOKEN = "t0ken-for-tests-0123456789"


# --- tokens and bind policy ------------------------------------------------------------------


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_token_sources_and_their_precedence(tmp_path: Path) -> None:
    f1 = _private(tmp_path / "one", "file-token-aaaaaaaaaaaa\n")
    f2 = _private(tmp_path / "two", "envfile-token-bbbbbbbbbb")
    assert load_token(env={}) is None
    assert (
        load_token(env={TOKEN_FILE_ENV: str(f2)}).get_secret_value() == "envfile-token-bbbbbbbbbb"
    )
    env = {TOKEN_ENV: "env-token-cccccccccccc", TOKEN_FILE_ENV: str(f2)}
    assert load_token(env=env).get_secret_value() == "env-token-cccccccccccc"
    assert load_token(f1, env=env).get_secret_value() == "file-token-aaaaaaaaaaaa"
    assert "file-token" not in repr(load_token(f1, env={}))  # never printed by accident


def test_bad_token_sources_say_how_to_fix_them(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    with pytest.raises(TokenError, match=f"mode 644.*chmod 600 {loose}"):
        read_token_file(loose)
    with pytest.raises(TokenError, match="has 5 characters; use at least 16"):
        load_token(env={TOKEN_ENV: "short"})
    with pytest.raises(TokenError, match="printable ASCII"):
        load_token(env={TOKEN_ENV: "a token with spaces inside"})
    with pytest.raises(TokenError, match=r"cannot read token file.*TANGRAM_API_TOKEN"):
        load_token(env={TOKEN_FILE_ENV: str(tmp_path / "missing")})
    made = new_token_file(tmp_path / "new")
    assert read_token_file(tmp_path / "new") == made
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        new_token_file(tmp_path / "new")


def test_tokens_compare_exactly() -> None:
    assert tokens_equal(TOKEN, TOKEN)
    assert tokens_equal(TOKEN.encode(), TOKEN)
    assert not tokens_equal(TOKEN + "x", TOKEN)
    assert not tokens_equal("", TOKEN)
    assert auth_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}


def test_only_loopback_may_run_without_a_token() -> None:
    for host in ("127.0.0.1", "127.5.0.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "10.1.2.3", "node-7.cluster", ""):
        assert not is_loopback(host), host
        with pytest.raises(InsecureBindError, match=f"on {host}:.*{TOKEN_ENV}.*--token-file"):
            check_bind(host, None, service="svc")
        check_bind(host, TOKEN)


def test_guard_config_rejects_nonsense() -> None:
    with pytest.raises(ValidationError, match="max_body_bytes"):
        GuardConfig(max_body_bytes=0)
    with pytest.raises(ValidationError, match=r"unknown_field|extra"):
        GuardConfig(unknown_field=1)  # type: ignore[call-arg]


# --- per-client limits (virtual clock) -------------------------------------------------------


def test_rate_limit_is_a_token_bucket_per_client() -> None:
    limiter = ClientLimiter(GuardConfig(client_rate=2.0, client_burst=3, client_concurrency=100))
    for _ in range(3):
        assert limiter.try_enter("a", now=0.0) is None
    denied = limiter.try_enter("a", now=0.0)
    assert denied is not None
    assert denied.status == 429
    assert "client_rate=2 requests/s" in denied.message
    assert denied.retry_after_s == pytest.approx(0.5)
    assert limiter.try_enter("b", now=0.0) is None  # another client is not affected
    assert limiter.try_enter("a", now=0.5) is None  # one token back after 1/rate
    assert limiter.try_enter("a", now=0.5) is not None


def test_concurrency_limit_counts_requests_in_progress() -> None:
    limiter = ClientLimiter(GuardConfig(client_concurrency=2, client_rate=1000, client_burst=1000))
    assert limiter.try_enter("a", 0.0) is None
    assert limiter.try_enter("a", 0.0) is None
    denied = limiter.try_enter("a", 0.0)
    assert denied is not None
    assert denied.status == 429
    assert "client_concurrency=2" in denied.message
    limiter.leave("a")
    assert limiter.try_enter("a", 0.0) is None
    assert limiter.active("a") == 2


def test_idle_clients_are_forgotten_past_the_bound() -> None:
    limiter = ClientLimiter(GuardConfig(max_clients_tracked=10))
    for i in range(100):
        assert limiter.try_enter(f"c{i}", 0.0) is None
        limiter.leave(f"c{i}")
    assert len(limiter._buckets) <= 10


# --- the middleware over the ASGI protocol ---------------------------------------------------


class App:
    """A tiny ASGI app: echoes the body after ``delay`` seconds; records calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.cancelled = 0
        self.running = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        self.calls += 1
        body = (await receive())["body"]
        self.running += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def call(
    guard: HttpGuard,
    *,
    path: str = "/work",
    headers: dict[str, str] | None = None,
    chunks: tuple[bytes, ...] = (b"{}",),
    client: str = "127.0.0.1",
    leave_after: float | None = None,
) -> tuple[int | None, dict[str, str], Any]:
    """One request through the guard; ``leave_after`` disconnects the client after that long."""
    hdrs = {"authorization": f"Bearer {TOKEN}", **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "client": (client, 5555),
        "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
    }
    pending = list(chunks)
    gone = asyncio.Event()
    if leave_after is not None:
        asyncio.get_running_loop().call_later(leave_after, gone.set)

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await gone.wait()
        return {"type": "http.disconnect"}

    out: dict[str, Any] = {"status": None, "headers": {}, "body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            out["body"] += message.get("body", b"")

    await guard(scope, receive, send)
    body = (
        json.loads(out["body"])
        if out["headers"].get("content-type") == "application/json"
        else out["body"]
    )
    return out["status"], out["headers"], body


def test_missing_or_wrong_token_is_401_and_does_no_work() -> None:
    app = App()
    guard = HttpGuard(app, token=TOKEN)

    async def main() -> None:
        status, headers, body = await call(guard, headers={"authorization": ""})
        assert status == 401
        assert body["detail"] == "invalid bearer token"
        scope_without = await call(guard, headers={"authorization": "Bearer wrong-token-0000000"})
        assert scope_without[0] == 401
        assert headers["www-authenticate"].startswith("Bearer")
        assert app.calls == 0
        status, _, body = await call(guard, chunks=(b"hello",))
        assert (status, body, app.calls) == (200, b"hello", 1)
        status, _, _ = await call(guard, path="/healthz", headers={"authorization": "nope"})
        assert status == 200  # an open path needs no token

    asyncio.run(main())


def test_missing_header_names_the_header_to_send() -> None:
    app = App()
    guard = HttpGuard(app, token=TOKEN)

    async def main() -> None:
        scope = {"type": "http", "path": "/x", "client": ("127.0.0.1", 1), "headers": []}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            raise AssertionError("the body must not be read before authentication")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await guard(scope, receive, send)
        assert sent[0]["status"] == 401
        assert "Authorization: Bearer <token>" in json.loads(sent[1]["body"])["detail"]

    asyncio.run(main())


def test_oversized_bodies_get_413_declared_or_streamed() -> None:
    app = App()
    guard = HttpGuard(app, GuardConfig(max_body_bytes=10), token=TOKEN)

    async def main() -> None:
        status, _, body = await call(guard, headers={"content-length": "11"}, chunks=(b"x" * 11,))
        assert status == 413
        assert "11 bytes, larger than max_body_bytes=10" in body["detail"]
        status, _, body = await call(guard, chunks=(b"x" * 6, b"y" * 6))  # chunked, no length
        assert status == 413
        assert "max_body_bytes=10" in body["detail"]
        status, _, body = await call(guard, headers={"content-length": "ten"})
        assert status == 400
        assert app.calls == 0
        assert (await call(guard, chunks=(b"x" * 5, b"y" * 5)))[:3:2] == (200, b"x" * 5 + b"y" * 5)
        assert guard.clients.active("127.0.0.1") == 0  # every path frees the client's slot

    asyncio.run(main())


def test_full_queue_answers_503_at_once_and_timeouts_do_too() -> None:
    """The third request meets a full queue and is refused while the queued one is still
    waiting out its ``queue_timeout_s``: the ordering says "at once" without a tight clock."""
    app = App(delay=2.0)
    cfg = GuardConfig(max_in_flight=1, max_queue=1, queue_timeout_s=1.0, client_concurrency=10)
    guard = HttpGuard(app, cfg, token=TOKEN)

    async def main() -> None:
        first = asyncio.ensure_future(call(guard))
        await asyncio.sleep(0.02)
        queued = asyncio.ensure_future(call(guard))
        await asyncio.sleep(0.02)
        status, headers, body = await call(guard)  # the queue (1) is full: 503 at once
        assert not queued.done(), "the full-queue 503 waited for the queue timeout"
        assert status == 503
        assert headers["retry-after"] == "1"
        assert "max_queue=1" in body["detail"]
        status, _, body = await queued  # waited queue_timeout_s for a slot: 503
        assert status == 503
        assert "queue_timeout_s=1s" in body["detail"]
        assert not first.done(), "the queued request was not refused at its own timeout"
        assert (await first)[0] == 200
        assert guard.stats.in_flight == 0
        assert guard.stats.queued == 0

    asyncio.run(main())


def test_queued_requests_get_freed_slots_in_order() -> None:
    app = App(delay=0.05)
    cfg = GuardConfig(max_in_flight=2, max_queue=10, client_concurrency=20)
    guard = HttpGuard(app, cfg, token=TOKEN)

    async def main() -> None:
        results = await asyncio.gather(*[call(guard, chunks=(str(i).encode(),)) for i in range(8)])
        assert [r[0] for r in results] == [200] * 8
        assert [r[2] for r in results] == [str(i).encode() for i in range(8)]
        assert guard.stats.in_flight == 0

    asyncio.run(main())


def test_a_client_that_leaves_frees_its_slot() -> None:
    app = App(delay=10.0)
    cfg = GuardConfig(max_in_flight=1, max_queue=5, client_concurrency=10, queue_timeout_s=30)
    guard = HttpGuard(app, cfg, token=TOKEN)

    async def main() -> None:
        running = asyncio.ensure_future(call(guard, leave_after=0.1))
        await asyncio.sleep(0.02)
        queued = asyncio.ensure_future(call(guard, leave_after=0.05))
        assert (await queued)[0] is None  # left while queued: no answer, no work
        assert (await running)[0] is None  # left while running: its work is cancelled
        assert app.cancelled == 1
        assert app.running == 0
        assert app.calls == 1
        assert guard.stats.disconnected == 2
        assert guard.stats.in_flight == 0
        assert guard.stats.queued == 0
        assert guard.clients.active("127.0.0.1") == 0
        app.delay = 0.0
        assert (await call(guard))[0] == 200

    asyncio.run(main())


# --- over a real loopback socket -------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[str]:
    uvicorn = pytest.importorskip("uvicorn")
    guard = HttpGuard(App(), GuardConfig(client_rate=5, client_burst=2), token=TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(guard, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_guard_over_a_real_socket(loopback_server: str) -> None:
    status, _, body = _post(loopback_server + "/x", b"{}", {})
    assert status == 401
    assert b"missing bearer token" in body
    good = auth_headers(TOKEN)
    status, _, body = _post(loopback_server + "/x", b"payload", good)
    assert (status, body) == (200, b"payload")
    statuses = [_post(loopback_server + "/x", b"", good)[:2] for _ in range(4)]
    limited = [(s, h) for s, h in statuses if s == 429]
    assert limited, statuses  # burst 2: the rest of a quick run is over the rate
    assert all(int(h["retry-after"]) >= 1 for _, h in limited)


def test_importing_the_guard_pulls_in_no_web_framework() -> None:
    code = (
        "import sys, tangram_core.http.guard; "
        "mods = ('fastapi', 'starlette', 'uvicorn', 'ray', 'torch'); "
        "print([m for m in mods if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
