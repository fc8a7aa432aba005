"""The HTTP face of a sandbox pool (FastAPI): our API, plus SandboxFusion's ``/run_code``.

Why SandboxFusion's shape too: verl's sandbox reward and many RL code-reward scripts already
POST to ``/run_code``; answering the same request and response lets an existing config point
at Tangram unchanged. Supported ``/run_code`` fields: ``code``, ``language`` (``python``,
``cpp``, ``bash``), ``stdin``, ``run_timeout``, ``compile_timeout``, ``memory_limit_MB``,
``files`` (base64) and ``fetch_files``; other SandboxFusion fields are rejected (422), never
silently ignored. Infrastructure failures answer ``status="SandboxError"``, which
SandboxFusion clients already treat as retryable.

The server binds 127.0.0.1 unless told otherwise (code execution is remote code execution by
design).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

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

__all__ = ["RunCodeRequest", "RunCodeResponse", "build_app"]


class RunCodeRequest(BaseModel):
    """SandboxFusion's ``POST /run_code`` request (the fields we support)."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., max_length=1 << 20)
    language: Literal["python", "cpp", "bash"] = "python"
    stdin: str | None = None
    run_timeout: float = Field(10.0, gt=0)
    compile_timeout: float = Field(10.0, gt=0)
    memory_limit_MB: int = Field(-1, description="-1: the server's default.")
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list)


class CommandResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


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
    )
    ok = result.status is RunStatus.OK
    return RunCodeResponse(
        status="Success" if ok else "Failed",
        message="" if ok else (result.error or result.status.value),
        run_result=run,
        files=result.files,
    )


def build_app(pool: SandboxPool | None = None, config: PoolConfig | None = None) -> FastAPI:
    """An app serving ``pool`` (started and closed with the app when it creates it)."""
    owned = pool is None
    the_pool = pool or SandboxPool(config or PoolConfig())

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

    async def guarded(call: Any) -> Any:
        try:
            return await call
        except QueueFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        except SandboxUnavailable as exc:
            raise HTTPException(503, str(exc)) from None

    @app.post("/run", response_model=RunResult)
    async def run(request: RunRequest) -> RunResult:
        result: RunResult = await guarded(the_pool.run(request))
        return result

    @app.post("/run_tests", response_model=RunTestsResult)
    async def run_tests(request: RunTestsRequest) -> RunTestsResult:
        result: RunTestsResult = await guarded(the_pool.run_tests(request))
        return result

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(request: RunCodeRequest) -> RunCodeResponse:
        defaults = the_pool.config.default_limits
        memory = request.memory_limit_MB if request.memory_limit_MB > 0 else defaults.memory_mb
        limits = Limits(
            wall_s=request.run_timeout,
            memory_mb=max(memory, 32),
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
            limits=limits,
        )
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
        }
        if not body["healthy"]:
            raise HTTPException(503, body)
        return body

    return app
