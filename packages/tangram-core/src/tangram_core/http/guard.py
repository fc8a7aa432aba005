"""What every Tangram HTTP server shares to be safe by default: token, bind policy and limits.

Why here, and why pure ASGI: the sandbox (FastAPI under uvicorn) and reward-serve (a plain
ASGI gateway under uvicorn, in front of Ray Serve handles) must enforce the same rules, and
tangram-core must not depend on a web framework, so
the guard speaks the ASGI protocol directly (three awaitables and dicts) and imports nothing
beyond the standard library and pydantic.

The pieces:

* **Token.** :func:`load_token` reads a bearer token from ``$TANGRAM_API_TOKEN``, from the file
  named by ``$TANGRAM_API_TOKEN_FILE``, or from a file given by path (``--token-file``), never
  from a command-line value, which every local user can read in ``ps``. Token files must be
  private (mode 600), like ssh keys. :func:`tokens_equal` compares in constant time.
* **Bind policy.** :func:`check_bind` refuses a non-loopback address without a token, with a
  message that says how to configure one.
* **Limits.** :class:`HttpGuard` is ASGI middleware that, in this order, answers 401 to a
  missing or wrong token (before reading the body: no work is done), 429 with ``Retry-After``
  when a client exceeds its rate or its concurrent requests, 413 when the body is larger than
  allowed, and 503 with ``Retry-After`` at once when the bounded queue is full (or a queued
  request waited too long) instead of letting it time out. A client that disconnects while
  queued or running frees its slot: the request is cancelled.

Clients identify by peer address (``scope["client"]``); behind a reverse proxy every client
shares one address, so set the per-client limits for the proxy as a whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = [
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "ClientLimiter",
    "GuardConfig",
    "GuardStats",
    "HttpGuard",
    "InsecureBindError",
    "Rejection",
    "TokenError",
    "auth_headers",
    "check_bind",
    "is_loopback",
    "load_token",
    "new_token_file",
    "read_token_file",
    "tokens_equal",
]

TOKEN_ENV = "TANGRAM_API_TOKEN"
TOKEN_FILE_ENV = "TANGRAM_API_TOKEN_FILE"
MIN_TOKEN_CHARS = 16

_HOW_TO_SET = (
    f"set {TOKEN_ENV}, or put a token in a file with mode 600 and set {TOKEN_FILE_ENV} or pass "
    "--token-file PATH; make one with: python -c 'import secrets; "
    "print(secrets.token_urlsafe(32))' > ~/.tangram_token && chmod 600 ~/.tangram_token"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenError(ValueError):
    """A token source exists but is unusable (too short, unreadable, readable by others)."""


class InsecureBindError(ValueError):
    """A server was asked to listen beyond loopback without a token."""


# --- tokens ----------------------------------------------------------------------------------


def _valid_token(token: str, source: str) -> SecretStr:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"the token from {source} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS}, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not all(33 <= ord(c) < 127 for c in token):
        raise TokenError(
            f"the token from {source} must be printable ASCII without spaces (it travels in an "
            "HTTP header); secrets.token_urlsafe(32) makes a good one"
        )
    return SecretStr(token)


def read_token_file(path: str | os.PathLike[str]) -> SecretStr:
    """The token in ``path``; the file must be private to its owner (no group/other bits)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as exc:
        raise TokenError(f"cannot read token file {p}: {exc.strerror}; {_HOW_TO_SET}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenError(f"token file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise TokenError(
            f"token file {p} has mode {stat.S_IMODE(st.st_mode):o}, readable by other users; "
            f"run: chmod 600 {p}"
        )
    return _valid_token(p.read_text(), f"file {p}")


def load_token(
    token_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> SecretStr | None:
    """The configured bearer token, or None when none is configured.

    Precedence: ``token_file`` (a path from ``--token-file``), then ``$TANGRAM_API_TOKEN``,
    then the file named by ``$TANGRAM_API_TOKEN_FILE``. There is deliberately no way to pass
    the token itself as an argument."""
    environ = os.environ if env is None else env
    if token_file is not None:
        return read_token_file(token_file)
    if environ.get(TOKEN_ENV):
        return _valid_token(environ[TOKEN_ENV], f"${TOKEN_ENV}")
    if environ.get(TOKEN_FILE_ENV):
        return read_token_file(environ[TOKEN_FILE_ENV])
    return None


def new_token_file(path: str | os.PathLike[str]) -> SecretStr:
    """Create ``path`` (mode 600, refusing to overwrite) holding a fresh random token."""
    p = Path(path).expanduser()
    token = secrets.token_urlsafe(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return SecretStr(token)


def tokens_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time comparison; hashing first hides the expected token's length too."""
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


def auth_headers(token: SecretStr | str | None = None) -> dict[str, str]:
    """Headers a project client sends: the given token, else the configured one (if any)."""
    tok = token if token is not None else load_token()
    if tok is None:
        return {}
    value = tok.get_secret_value() if isinstance(tok, SecretStr) else tok
    return {"Authorization": f"Bearer {value}"}


# --- bind policy -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs; every other name or address (``0.0.0.0``,
    ``::``, a hostname) counts as reachable from the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: SecretStr | str | None, service: str = "server") -> None:
    """Refuse to listen on a non-loopback ``host`` without a token."""
    if token is None and not is_loopback(host):
        raise InsecureBindError(
            f"refusing to start {service} on {host}: listening beyond loopback needs a bearer "
            f"token. Either bind 127.0.0.1 (the default), or {_HOW_TO_SET}"
        )


# --- limits (pure logic) ---------------------------------------------------------------------


class GuardConfig(BaseModel):
    """Request limits of one HTTP server. Each has a default that is safe on a shared node."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_body_bytes: int = Field(
        8 << 20, ge=1, description="Largest request body; larger gets 413 before it is read."
    )
    max_in_flight: int = Field(64, ge=1, description="Requests handled at once (all clients).")
    max_queue: int = Field(
        128, ge=0, description="Requests waiting for a slot; past it, 503 at once."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a slot; then 503 instead of a client timeout."
    )
    client_concurrency: int = Field(
        32, ge=1, description="Requests one client may have queued or running; past it, 429."
    )
    client_rate: float = Field(
        200.0, gt=0, description="Sustained requests per second per client; past it, 429."
    )
    client_burst: int = Field(400, ge=1, description="Requests a client may send at once.")
    open_paths: tuple[str, ...] = Field(
        ("/healthz",), description="Paths served without a token (health probes; no work)."
    )
    max_clients_tracked: int = Field(
        10_000, ge=1, description="Rate buckets kept; the idlest are forgotten past it."
    )


@dataclass(frozen=True)
class Rejection:
    """A request refused by a limit: the status, a message that says why, and a retry hint."""

    status: int
    message: str
    retry_after_s: float | None = None


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    active: int = 0


class ClientLimiter:
    """Per-client token-bucket rate and concurrency limits. Pure logic; the clock is passed
    in so that tests and simulations control time."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def try_enter(self, client: str, now: float) -> Rejection | None:
        """Admit one request from ``client`` (then call :meth:`leave`), or say why not."""
        cfg = self.config
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = _Bucket(tokens=float(cfg.client_burst), stamp=now)
            self._buckets[client] = bucket
            self._forget_idle()
        self._buckets.move_to_end(client)
        bucket.tokens = min(
            float(cfg.client_burst), bucket.tokens + (now - bucket.stamp) * cfg.client_rate
        )
        bucket.stamp = now
        if bucket.active >= cfg.client_concurrency:
            return Rejection(
                429,
                f"too many concurrent requests from {client}: {bucket.active} in progress, "
                f"client_concurrency={cfg.client_concurrency}; wait for one to finish",
                1.0,
            )
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / cfg.client_rate
            return Rejection(
                429,
                f"rate limit exceeded for {client}: client_rate={cfg.client_rate:g} requests/s "
                f"(burst {cfg.client_burst}); retry after {wait:.2f}s",
                wait,
            )
        bucket.tokens -= 1.0
        bucket.active += 1
        return None

    def leave(self, client: str) -> None:
        bucket = self._buckets.get(client)
        if bucket is not None:
            bucket.active = max(0, bucket.active - 1)

    def active(self, client: str) -> int:
        bucket = self._buckets.get(client)
        return bucket.active if bucket else 0

    def _forget_idle(self) -> None:
        over = len(self._buckets) - self.config.max_clients_tracked
        for key in list(self._buckets):
            if over <= 0:
                break
            if self._buckets[key].active == 0:
                del self._buckets[key]
                over -= 1


@dataclass
class GuardStats:
    """What the guard decided, by status: for health endpoints, tests and benchmarks."""

    responses: collections.Counter[int] = field(default_factory=collections.Counter)
    rejected: collections.Counter[int] = field(default_factory=collections.Counter)
    disconnected: int = 0
    in_flight: int = 0
    queued: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "disconnected": self.disconnected,
            "in_flight": self.in_flight,
            "queued": self.queued,
        }


# --- the middleware --------------------------------------------------------------------------


async def send_json(
    send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> None:
    """Send a complete JSON response (no framework needed)."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class _Disconnected(Exception):
    pass


async def _until_disconnect(receive: Receive) -> Message:
    """Wait for the client to leave (after the body, a server sends nothing else)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return message


class HttpGuard:
    """ASGI middleware: authentication, per-client limits, body size, a bounded queue.

    ``token=None`` disables authentication (loopback-only servers; :func:`check_bind` decides
    whether that is allowed). ``stats`` may be passed in to read the counters from outside
    (frameworks such as Starlette build middleware lazily)."""

    def __init__(
        self,
        app: ASGIApp,
        config: GuardConfig | None = None,
        token: SecretStr | str | None = None,
        stats: GuardStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.config = config or GuardConfig()
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._expected = f"Bearer {secret}".encode() if secret is not None else None
        self.stats = stats if stats is not None else GuardStats()
        self.clients = ClientLimiter(self.config)
        self._clock = clock
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind != "http":  # websockets: none of our servers speaks them
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("path") in self.config.open_paths:
            await self.app(scope, receive, send)
            return
        await self._guarded(scope, receive, self._counting(send))

    def _counting(self, send: Send) -> Send:
        async def counted(message: Message) -> None:
            if message.get("type") == "http.response.start":
                self.stats.responses[int(message["status"])] += 1
            await send(message)

        return counted

    async def _reject(self, send: Send, rejection: Rejection) -> None:
        self.stats.rejected[rejection.status] += 1
        headers: dict[str, str] = {}
        if rejection.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="tangram"'
        if rejection.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(rejection.retry_after_s)))
        await send_json(send, rejection.status, {"detail": rejection.message}, headers)

    def _authenticate(self, scope: Scope) -> Rejection | None:
        if self._expected is None:
            return None
        given = _header(scope, b"authorization")
        if given is None:
            return Rejection(
                401,
                "missing bearer token: send the header 'Authorization: Bearer <token>' with the "
                f"token this server was started with (${TOKEN_ENV} or its token file)",
            )
        if not tokens_equal(given, self._expected):
            return Rejection(401, "invalid bearer token")
        return None

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        denied = self._authenticate(scope)
        if denied is not None:
            await self._reject(send, denied)
            return
        client = _client(scope)
        denied = self.clients.try_enter(client, self._clock())
        if denied is not None:
            await self._reject(send, denied)
            return
        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, Rejection):
                await self._reject(send, body)
                return
            await self._run(scope, receive, send, body)
        except _Disconnected:
            self.stats.disconnected += 1
        finally:
            self.clients.leave(client)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Rejection:
        limit = self.config.max_body_bytes
        declared = _header(scope, b"content-length")
        too_big = (
            f"request body is larger than max_body_bytes={limit}; send less (e.g. fewer test "
            "cases per request) or raise the server's limit"
        )
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return Rejection(400, f"Content-Length {declared[:32]!r} is not a number")
            if size > limit:
                return Rejection(413, too_big.replace("larger", f"{size} bytes, larger", 1))
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return Rejection(413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _acquire(self, disconnect: asyncio.Future[Message]) -> Rejection | None:
        cfg = self.config
        if self.stats.in_flight < cfg.max_in_flight and not self._waiters:
            self.stats.in_flight += 1
            return None
        if len(self._waiters) >= cfg.max_queue:
            return Rejection(
                503,
                f"server is at capacity ({self.stats.in_flight} running, {len(self._waiters)} "
                f"queued, max_queue={cfg.max_queue}); retry later",
                1.0,
            )
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        self.stats.queued += 1
        waiting: set[asyncio.Future[Any]] = {slot, disconnect}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=cfg.queue_timeout_s, return_when="FIRST_COMPLETED"
            )
        finally:
            self.stats.queued -= 1
            if not slot.done():
                slot.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(slot)
        if slot in done or (slot.done() and not slot.cancelled()):
            if disconnect in done:  # the slot came with the disconnect: pass it on
                self._release()
                raise _Disconnected
            return None
        if disconnect in done:
            raise _Disconnected
        return Rejection(
            503,
            f"no free slot within queue_timeout_s={cfg.queue_timeout_s:g}s; the server is "
            "overloaded, retry later",
            1.0,
        )

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes straight to the next waiter
                return
        self.stats.in_flight -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        disconnect: asyncio.Future[Message] = asyncio.ensure_future(_until_disconnect(receive))
        try:
            denied = await self._acquire(disconnect)
            if denied is not None:
                await self._reject(send, denied)
                return
            try:
                await self._call_app(scope, send, body, disconnect)
            finally:
                self._release()
        finally:
            if not disconnect.done():
                disconnect.cancel()

    async def _call_app(
        self, scope: Scope, send: Send, body: bytes, disconnect: asyncio.Future[Message]
    ) -> None:
        delivered = False
        completed = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.shield(disconnect)

        async def tracked(message: Message) -> None:
            nonlocal completed
            if message.get("type") == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        task: asyncio.Future[Any] = asyncio.ensure_future(self.app(scope, replay, tracked))
        racing: set[asyncio.Future[Any]] = {task, disconnect}
        done, _ = await asyncio.wait(racing, return_when="FIRST_COMPLETED")
        if task not in done and not completed:
            # The client left: cancel its work so that its slot (and worker) are freed.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _Disconnected
        await task
