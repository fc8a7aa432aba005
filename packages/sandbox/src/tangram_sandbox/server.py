"""The HTTP face of a sandbox pool (FastAPI): our API, plus SandboxFusion's ``/run_code``.

Why SandboxFusion's shape too: verl's sandbox reward and many RL code-reward scripts already
POST to ``/run_code``; answering the same request and response lets an existing config point
at Tangram unchanged. Supported ``/run_code`` fields: ``code``, ``language`` (``python``,
``cpp``, ``bash``), ``stdin``, ``run_timeout``, ``compile_timeout``, ``memory_limit_MB``,
``files`` (base64) and ``fetch_files``; other SandboxFusion fields are rejected (422), never
silently ignored. Infrastructure failures answer ``status="SandboxError"``, which
SandboxFusion clients already treat as retryable.

Safety (code execution is remote code execution by design): every request passes
:class:`tangram_core.http_guard.HttpGuard` (bearer token, per-client rate and concurrency,
body size, bounded queue), then :class:`ApiLimits` (code size, test cases, captured output),
then the pool, which clamps time and memory limits to ``PoolConfig.max_limits``. The CLI binds
127.0.0.1 unless told otherwise and refuses any other address without a token.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from tangram_core.http_guard import GuardConfig, GuardStats, HttpGuard
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import (
    Limits,
    RunRequest,
    RunResult,
    RunStatus,
    RunTestsRequest,
    RunTestsResult,
)
from tangram_sandbox.pool import QueueFull, SandboxPool, SandboxUnavailable

__all__ = ["ApiLimits", "RunCodeRequest", "RunCodeResponse", "build_app"]


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


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``POST /run_code`` request (the fields we support)."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., max_length=1 << 20)
    language: Literal["python", "cpp", "bash"] = "python"
    stdin: str | None = None
    run_timeout: float = Field(10.0, gt=0, description="Seconds; clamped to the server's max.")
    compile_timeout: float = Field(10.0, gt=0)
    memory_limit_MB: int = Field(
        -1, ge=-1, description="-1: the server's default; clamped to the server's max."
    )
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("memory_limit_MB")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value == 0:
            raise ValueError("memory_limit_MB must be -1 (the server's default) or positive")
        return value


class CommandResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class RunCodeResponse(BaseModel):
    """SandboxFusion's ``/run_code`` response."""

    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: CommandResult | None = None
    run_result: CommandResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


def _fusion_response(result: RunResult) -> RunCodeResponse:
    if result.status is RunStatus.SANDBOX_ERROR:
        return RunCodeResponse(status="SandboxError", message=result.error or "")
    if result.status is RunStatus.COMPILE_ERROR:
        compile_result = CommandResult(
            status="Error", return_code=result.exit_code, stderr=result.stderr, stdout=""
        )
        return RunCodeResponse(status="Failed", compile_result=compile_result)
    run_status: Literal["Finished", "Error", "TimeLimitExceeded"] = "Finished"
    if result.status is RunStatus.TIMEOUT:
        run_status = "TimeLimitExceeded"
    run = CommandResult(
        status=run_status,
        execution_time=result.wall_s,
        return_code=result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )
    ok = result.status is RunStatus.OK
    return RunCodeResponse(
        status="Success" if ok else "Failed",
        message="" if ok else (result.error or result.status.value),
        run_result=run,
        files=result.files,
    )


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
) -> FastAPI:
    """An app serving ``pool`` (started and closed with the app when it creates it).

    ``token`` turns on bearer authentication (every path but ``/healthz``); ``guard`` and
    ``api`` set the limits (defaults when None); ``stats`` receives the guard's counters.
    Whether a server may run without a token is the caller's decision
    (:func:`tangram_core.http_guard.check_bind`; the CLI makes it)."""
    owned = pool is None
    the_pool = pool or SandboxPool(config or PoolConfig())
    limits_api = api or ApiLimits()
    guard_stats = stats if stats is not None else GuardStats()

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
    app.add_middleware(
        HttpGuard,
        config=guard or GuardConfig(),
        token=token,
        stats=guard_stats,
    )

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
    async def run_code(request: RunCodeRequest) -> RunCodeResponse:
        defaults = the_pool.config.default_limits
        maximum = the_pool.config.max_limits
        memory = request.memory_limit_MB if request.memory_limit_MB > 0 else defaults.memory_mb
        try:
            limits = Limits(
                wall_s=min(request.run_timeout, maximum.wall_s),
                memory_mb=min(max(memory, 32), maximum.memory_mb),
                processes=defaults.processes,
                output_bytes=defaults.output_bytes,
            )
            files = {name: content or "" for name, content in request.files.items()}
            run_request = RunRequest(
                code=request.code,
                language=request.language,
                stdin=request.stdin or "",
                files=files,
                fetch_files=request.fetch_files,
                limits=checked_limits(request.code, limits),
            )
        except ValidationError as exc:
            raise _revalidated(exc) from None
        return _fusion_response(await guarded(the_pool.run(run_request)))

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
