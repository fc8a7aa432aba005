"""The HTTP face of a sandbox pool (FastAPI): our API, plus SandboxFusion's ``/run_code``.

Why SandboxFusion's shape too: verl's sandbox reward and many RL code-reward scripts already
POST to ``/run_code``; answering the same request and response lets an existing config point
at Tangram unchanged. The request and response follow SandboxFusion's ``sandbox/server/
sandbox_api.py`` and ``sandbox/runners/types.py`` field by field (``language`` required,
``memory_limit_MB=-1``, ``files`` values of null skipped, ``compile_result`` for compiled
languages, a compile error as ``Finished`` with a non-zero return code, ``return_code`` null
on a timeout, ``message`` empty unless ``SandboxError``), plus flags SandboxFusion lacks:
``stdout_truncated``/``stderr_truncated`` and ``files_truncated``. A field or language we do
not support is a 422 that names it, never silently ignored. ``GET /v1/ping`` answers
``"pong"``.

verl's client (``verl/utils/reward_score/sandbox_fusion/utils.py``) retries only on HTTP 504;
any other error status, and a ``SandboxError`` body, score the test case as failed. So on
``/run_code`` every answer that means "not now, retry" (the guard's 429 and 503, the pool's
queue full, a sandbox error) is a 504 with ``Retry-After``: an overloaded or failing sandbox
makes verl retry instead of scoring a sample 0. verl sends no ``Authorization`` header, so an
operator may name client networks (``allow_networks``) whose requests to ``/run_code`` need no
token; every other route, and every other client, still needs it.

Safety (code execution is remote code execution by design): every request passes
:class:`tangram_core.http.guard.HttpGuard` (bearer token, per-client rate and concurrency,
body size, bounded queue), then :class:`ApiLimits` (code size, test cases, captured output),
then the pool, which clamps time and memory limits to ``PoolConfig.max_limits``. The CLI binds
127.0.0.1 unless told otherwise and refuses any other address without a token.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tangram_core.http.guard import GuardConfig, GuardStats, HttpGuard
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import (
    Language,
    Limits,
    RunRequest,
    RunResult,
    RunStatus,
    RunTestsRequest,
    RunTestsResult,
)
from tangram_sandbox.pool import QueueFull, SandboxPool, SandboxUnavailable

__all__ = [
    "FUSION_PATHS",
    "RETRY_STATUS",
    "ApiLimits",
    "RunCodeRequest",
    "RunCodeResponse",
    "build_app",
    "parse_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: SandboxFusion's routes that run code: the network allow-list and the retry status apply here.
FUSION_PATHS = ("/run_code",)
#: The one status verl's SandboxFusion client retries (``call_sandbox_api``).
RETRY_STATUS = 504
_PING = "/v1/ping"


class ApiLimits(BaseModel):
    """What one request may ask of the server, past the body size the guard already bounds.
    Over a limit is a 422 that names the field and the limit; output over the limit is
    truncated and flagged (``stdout_truncated``), never unbounded."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_code_chars: int = Field(1 << 20, ge=1, description="Longest program source.")
    max_tests: int = Field(1000, ge=1, description="Most test cases in one run_tests request.")
    max_output_bytes: int = Field(
        1 << 20, ge=0, description="stdout and stderr kept per run (per test), each."
    )


#: SandboxFusion's other names for our languages (``MAJOR_RUNNERS`` in its runners/major.py).
FUSION_ALIASES = {"js": "nodejs", "ts": "typescript"}
#: Our languages whose SandboxFusion runner has no compile step: TypeScript runs under
#: ``tsx``, so SandboxFusion reports its syntax errors as the run's, with no compile_result.
#: (Ours translates it once and caches the JavaScript; the answer keeps SandboxFusion's shape.)
FUSION_RUN_ONLY = frozenset({"typescript"})


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``POST /run_code`` request (``sandbox_api.RunCodeRequest``): the same
    fields, defaults and meanings, restricted to the languages this pool runs."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., max_length=1 << 20)
    language: Language = Field(..., description="Required, as in SandboxFusion.")
    stdin: str | None = None
    run_timeout: float = Field(10.0, gt=0, description="Seconds; clamped to the server's max.")
    compile_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds for the compile step (compiled languages); clamped to the pool's "
        "compile limit.",
    )
    memory_limit_MB: int = Field(
        -1, ge=-1, description="-1: the server's maximum; otherwise clamped to it."
    )
    files: dict[str, str | None] = Field(
        default_factory=dict,
        description="Path to base64 content; a null value is skipped, as in SandboxFusion.",
    )
    fetch_files: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("language", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return FUSION_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("memory_limit_MB")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value == 0:
            raise ValueError("memory_limit_MB must be -1 (the server's maximum) or positive")
        return value


class CommandResult(BaseModel):
    """SandboxFusion's ``CommandRunResult``, plus the truncation flags it lacks (SandboxFusion
    cuts output at 1 MiB without saying so; extra keys are ignored by its clients)."""

    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class RunCodeResponse(BaseModel):
    """SandboxFusion's ``/run_code`` response, plus ``files_truncated``: the fetched files
    cut at the server's fetch limit (``files`` holds their first bytes)."""

    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: CommandResult | None = None
    run_result: CommandResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    files_truncated: list[str] = Field(default_factory=list)


def _command(result: RunResult) -> CommandResult:
    """One step as SandboxFusion's ``run_command_bare`` reports it: a timeout has no return
    code; anything that ran to its end is ``Finished`` with the exit code, whatever it was."""
    timed_out = result.status is RunStatus.TIMEOUT
    return CommandResult(
        status="TimeLimitExceeded" if timed_out else "Finished",
        execution_time=result.wall_s,
        return_code=None if timed_out else result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )


def _fusion_response(result: RunResult, language: str) -> RunCodeResponse:
    """``result`` as SandboxFusion answers the same outcome (``sandbox_api.parse_run_status``):
    a failed compile step is the ``compile_result`` with no ``run_result``; ``message`` is
    empty unless the sandbox itself failed. For a language SandboxFusion runs without a
    compile step (:data:`FUSION_RUN_ONLY`), our compile step is folded into the run."""
    if result.status is RunStatus.SANDBOX_ERROR:
        return RunCodeResponse(status="SandboxError", message=result.error or "sandbox error")
    run_only = language in FUSION_RUN_ONLY
    if result.compiled is False:
        if run_only:
            return RunCodeResponse(status="Failed", run_result=_command(result))
        return RunCodeResponse(status="Failed", compile_result=_command(result))
    compile_result = None
    if result.compiled and not run_only:
        compile_result = CommandResult(
            status="Finished", execution_time=result.compile_s, return_code=0, stdout="", stderr=""
        )
    return RunCodeResponse(
        status="Success" if result.status is RunStatus.OK else "Failed",
        compile_result=compile_result,
        run_result=_command(result),
        files=result.files,
        files_truncated=result.files_truncated,
    )


def parse_networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    """Client networks (CIDR) whose requests to :data:`FUSION_PATHS` need no token.

    Strict on purpose: host bits must be zero (``10.0.0.0/8``, not ``10.1.2.3/8``), so what
    is written is what is allowed; and a ``/0`` is refused, since letting every address in is
    running without a token, which only a loopback server may do."""
    networks: list[Network] = []
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip() if isinstance(value, str) else value)
        except ValueError as exc:
            raise ValueError(
                f"allow_networks: {str(value)!r} is not a network in CIDR form "
                f"(e.g. 10.0.0.0/8 or fd00::/8): {exc}"
            ) from None
        if network.prefixlen == 0:
            raise ValueError(
                f"allow_networks: {str(value)!r} would let every client run code without a "
                "token; name the networks your trainers run in (e.g. 10.0.0.0/8)"
            )
        networks.append(network)
    return tuple(networks)


def _client_ip(scope: Scope) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    client = scope.get("client")
    if not client:
        return None
    try:
        ip = ipaddress.ip_address(client[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return ip


class _FusionEdge:
    """ASGI middleware outside :class:`HttpGuard`, for :data:`FUSION_PATHS` only.

    Why a layer of its own: the guard is shared by every Tangram server and knows nothing of
    SandboxFusion's clients; what they need belongs to this protocol's routes.

    * A request from an allowed network that carries no ``Authorization`` header gets the
      server's own token before the guard sees it: it passes authentication and then every
      limit (rate, concurrency, body size, queue) like any other request. A request that
      sends a token is judged on it.
    * A 429 or 503, from the guard or the handler, becomes :data:`RETRY_STATUS` with its
      ``Retry-After`` kept, because verl retries that status and scores any other as a
      failed test. The guard's counters still record its own decision (429 or 503)."""

    def __init__(
        self, app: ASGIApp, *, token: SecretStr | str | None, networks: tuple[Network, ...]
    ) -> None:
        self.app = app
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._auth = f"Bearer {secret}".encode() if secret is not None and networks else None
        self._networks = networks

    def _allowed(self, scope: Scope) -> bool:
        if any(key.lower() == b"authorization" for key, _ in scope.get("headers") or ()):
            return False
        ip = _client_ip(scope)
        return ip is not None and any(ip in network for network in self._networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path") not in FUSION_PATHS:
            await self.app(scope, receive, send)
            return
        if self._auth is not None and self._allowed(scope):
            scope = {**scope, "headers": [*scope["headers"], (b"authorization", self._auth)]}

        async def retryable(message: Message) -> None:
            if message.get("type") == "http.response.start" and message["status"] in (429, 503):
                message = {**message, "status": RETRY_STATUS}
            await send(message)

        await self.app(scope, receive, retryable)


def _invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the field and the rule."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])


def _errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the offending input: echoing it back could be megabytes, or
    a NaN that JSON cannot carry."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": _errors(errors)}, status_code=422)


def _revalidated(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    )


def build_app(
    pool: SandboxPool | None = None,
    config: PoolConfig | None = None,
    *,
    token: SecretStr | str | None = None,
    guard: GuardConfig | None = None,
    api: ApiLimits | None = None,
    stats: GuardStats | None = None,
    allow_networks: Iterable[str | Network] = (),
) -> FastAPI:
    """An app serving ``pool`` (started and closed with the app when it creates it).

    ``token`` turns on bearer authentication (every path but ``/healthz`` and SandboxFusion's
    ``/v1/ping``, which do no work); ``guard`` and ``api`` set the limits (defaults when
    None); ``stats`` receives the guard's counters; ``allow_networks`` (CIDR) lets clients in
    those networks call :data:`FUSION_PATHS` without the token (verl sends none). Whether a
    server may run without a token is the caller's decision
    (:func:`tangram_core.http.guard.check_bind`; the CLI makes it)."""
    owned = pool is None
    the_pool = pool or SandboxPool(config or PoolConfig())
    limits_api = api or ApiLimits()
    guard_stats = stats if stats is not None else GuardStats()
    guard_config = guard or GuardConfig()
    if _PING not in guard_config.open_paths:
        guard_config = guard_config.model_copy(
            update={"open_paths": (*guard_config.open_paths, _PING)}
        )
    networks = parse_networks(allow_networks)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await the_pool.start()
        try:
            yield
        finally:
            if owned:
                await the_pool.close()

    app = FastAPI(title="tangram-sandbox", lifespan=lifespan)
    app.state.guard_stats = guard_stats
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_middleware(HttpGuard, config=guard_config, token=token, stats=guard_stats)
    app.add_middleware(_FusionEdge, token=token, networks=networks)  # outermost: sees the guard

    def checked_limits(code: str, limits: Limits) -> Limits:
        if len(code) > limits_api.max_code_chars:
            raise _invalid(
                "code",
                f"code has {len(code)} characters; this server accepts at most "
                f"max_code_chars={limits_api.max_code_chars}",
                "too_long",
            )
        return limits.model_copy(
            update={"output_bytes": min(limits.output_bytes, limits_api.max_output_bytes)}
        )

    async def guarded(call: Any) -> Any:
        try:
            return await call
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        except SandboxUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None

    def fusion_request(request: RunCodeRequest) -> RunRequest:
        """Our request for SandboxFusion's: its limits clamped to the server's, and its null
        files skipped as SandboxFusion's ``restore_files`` skips them."""
        pool_config = the_pool.config
        maximum = pool_config.max_limits
        memory = request.memory_limit_MB
        memory = maximum.memory_mb if memory == -1 else min(max(memory, 32), maximum.memory_mb)
        try:
            limits = Limits(
                wall_s=min(request.run_timeout, maximum.wall_s),
                memory_mb=memory,
                processes=pool_config.default_limits.processes,
                output_bytes=pool_config.default_limits.output_bytes,
            )
            return RunRequest(
                code=request.code,
                language=request.language,
                stdin=request.stdin or "",
                files={k: v for k, v in request.files.items() if v is not None},
                fetch_files=request.fetch_files,
                limits=checked_limits(request.code, limits),
                compile_timeout_s=min(request.compile_timeout, pool_config.compile_limits.wall_s),
            )
        except ValidationError as exc:
            raise _revalidated(exc) from None

    @app.post("/run", response_model=RunResult)
    async def run(request: RunRequest) -> RunResult:
        limits = checked_limits(request.code, request.limits)
        result: RunResult = await guarded(
            the_pool.run(request.model_copy(update={"limits": limits}))
        )
        return result

    @app.post("/run_tests", response_model=RunTestsResult)
    async def run_tests(request: RunTestsRequest) -> RunTestsResult:
        limits = checked_limits(request.code, request.limits)
        if len(request.tests) > limits_api.max_tests:
            raise _invalid(
                "tests",
                f"{len(request.tests)} test cases; this server accepts at most "
                f"max_tests={limits_api.max_tests} per request (split the batch)",
                "too_long",
            )
        clamped = request.model_copy(update={"limits": limits})
        result: RunTestsResult = await guarded(the_pool.run_tests(clamped))
        return result

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(request: RunCodeRequest) -> Any:
        result = await guarded(the_pool.run(fusion_request(request)))
        response = _fusion_response(result, request.language)
        if response.status == "SandboxError":
            # The infrastructure failed, not the program: ask for a retry (see the module doc).
            return JSONResponse(
                response.model_dump(), status_code=RETRY_STATUS, headers={"Retry-After": "1"}
            )
        return response

    @app.get(_PING)
    async def ping() -> str:
        """SandboxFusion's liveness probe (its ``server.py``): ``"pong"``, no work done."""
        return "pong"

    @app.get("/capabilities")
    async def capabilities() -> dict[str, Any]:
        return the_pool.caps.model_dump() if the_pool.caps else {}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        body = {
            "healthy": the_pool.healthy(),
            "workers": the_pool.size,
            "busy": the_pool.busy,
            "queued": the_pool.queued,
            "http": guard_stats.as_dict(),
        }
        if not body["healthy"]:
            raise HTTPException(503, body)
        return body

    return app
