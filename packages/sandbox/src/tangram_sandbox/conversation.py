"""One request's conversation with a zygote worker: the frames it is sent, and its replies read.

Why apart from the pool: the pool decides which worker runs what and when; this is the
protocol (:mod:`tangram_sandbox.wire`) a request speaks once it has a worker: an optional
compile step, one job per program run (or a batch of tests in few processes), then the files
to fetch. Everything read here comes from a process that ran untrusted code, so a frame out of
place kills the worker (:class:`~tangram_sandbox.worker.WorkerDied`), and a batch's records
are parsed as hostile (:func:`~tangram_sandbox.verdicts.parse_records`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from tangram_sandbox import wire
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.languages import language_spec
from tangram_sandbox.models import (
    CallTest,
    Limits,
    RunRequest,
    RunResult,
    RunStatus,
    RunTestsRequest,
    TestVerdict,
)
from tangram_sandbox.verdicts import classify, judge, parse_records
from tangram_sandbox.worker import WorkerDied, ZygoteWorker


class Conversation:
    """The protocol under one pool's config (its limits, grace time and languages)."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config

    async def batch_tests(
        self,
        worker: ZygoteWorker,
        req: RunTestsRequest,
        limits: Limits,
        verdicts: list[TestVerdict],
    ) -> RunResult | None:
        """Run the tests in as few program processes as possible (see :mod:`.batch`); append
        verdicts in order. A compile failure is returned instead."""
        total = len(req.tests)
        start = 0
        frames = self.compile_frames(req) + self.batch_frames(req, limits, start)
        await worker.send(frames)
        compiled = await self.compiled(worker, req)
        while True:
            batch_limits = self.batch_limits(limits, total - start)
            raw = await self.read_job(worker, batch_limits, lines=True)
            if compiled is not None:
                break
            if "sandbox_error" in raw:
                raise WorkerDied(raw["sandbox_error"])
            tampered = False
            for record in raw["records"]:
                if record is None or record.get("i") != start or start >= total:
                    tampered = True  # the program wrote on the harness's channel
                    break
                verdicts.append(judge(start, req.tests[start], record, limits, req.rel_tol))
                start += 1
            if start >= total:
                break
            # The process ended while running test `start`: that test's fate is the process's.
            status, message = classify(raw, self.batch_limits(limits, total - start))
            if status is RunStatus.SANDBOX_ERROR:
                raise WorkerDied(message or "sandbox error")
            if tampered:
                status, message = RunStatus.RUNTIME_ERROR, "the program wrote on fd 3"
            elif status is RunStatus.OK:
                status, message = RunStatus.RUNTIME_ERROR, "the program ended the test run early"
            verdicts.append(
                TestVerdict(
                    index=start,
                    passed=False,
                    status=status,
                    stdout="",
                    stderr=raw.get("stderr", "")[-4096:],
                    message=message,
                )
            )
            start += 1
            if start >= total:
                break
            await worker.send(self.batch_frames(req, limits, start))
        await worker.send(wire.encode_json({"op": "fetch", "names": []}))
        await self.read_fetch(worker)
        return compiled

    def batch_limits(self, per_test: Limits, n: int) -> Limits:
        cap = self.config.max_limits
        return per_test.model_copy(
            update={
                "wall_s": min(per_test.wall_s * n + 1.0, cap.wall_s),
                "cpu_s": min(per_test.effective_cpu_s() * n + 1.0, cap.effective_cpu_s()),
            }
        )

    def batch_frames(self, req: RunTestsRequest, limits: Limits, start: int) -> bytes:
        tests: list[dict[str, Any]] = []
        for test in req.tests[start:]:
            if isinstance(test, CallTest):
                tests.append({"fn": {"name": test.fn, "args": test.args, "kwargs": test.kwargs}})
            else:
                tests.append({"stdin": test.stdin})
        batch_limits = self.batch_limits(limits, len(tests))
        spec = language_spec(req.language, self.config)
        job: dict[str, Any] = {"tests": tests, "first": start, "test_limits": limits.wire()}
        job.update(spec.run_job(req.code, req.files, limits.memory_mb))
        meta = {"op": "job", "limits": batch_limits.wire(), "binary": spec.compiled}
        return self.frames(meta, self.payload(req, batch_limits, **job))

    @property
    def fetch_limit(self) -> int:
        return self.config.max_limits.output_bytes

    def payload(
        self, req: RunRequest | RunTestsRequest, limits: Limits, **job: Any
    ) -> dict[str, Any]:
        return {
            "language": req.language,
            "code": req.code,
            "files": req.files,
            "limits": limits.wire(),
            **job,
        }

    @staticmethod
    def frames(meta: dict[str, Any], payload: dict[str, Any]) -> bytes:
        return wire.encode_json(meta) + wire.encode_typed(
            wire.PAYLOAD, json.dumps(payload, separators=(",", ":")).encode()
        )

    def compile_frames(self, req: RunRequest | RunTestsRequest) -> bytes:
        spec = language_spec(req.language, self.config)
        if not spec.compiled:
            return b""
        # Everything the compiler reads: the tools themselves, their argv and environment, the
        # source and every file beside it (a header in ``files`` changes the binary as much as
        # the source does). See LanguageSpec.cache_key_parts.
        key = hashlib.sha256(
            json.dumps(spec.cache_key_parts(req.code, req.files), sort_keys=True).encode()
        ).hexdigest()
        limits = self.compile_limits(req)
        job = spec.compile_job(req.code, req.files, limits.memory_mb)
        meta = {"op": "job", "compile": key, "limits": limits.wire()}
        return self.frames(meta, self.payload(req, limits, stdin="", **job))

    def job_frames(
        self,
        req: RunRequest | RunTestsRequest,
        limits: Limits,
        stdin: str = "",
        fn: dict[str, Any] | None = None,
        last: bool = False,
    ) -> bytes:
        """A job's frames. ``last``: the job ends its request (no fetch follows), so the
        worker answers it at once and lets the program's files go after the answer."""
        spec = language_spec(req.language, self.config)
        job = spec.run_job(req.code, req.files, limits.memory_mb)
        job["stdin"] = stdin
        if fn is not None:
            job["fn"] = fn
        meta = {
            "op": "job",
            "limits": limits.wire(),
            "binary": spec.compiled,
        }
        if last:
            meta["last"] = True
        return self.frames(meta, self.payload(req, limits, **job))

    def test_frames(self, req: RunTestsRequest, limits: Limits, test: Any) -> bytes:
        if isinstance(test, CallTest):
            fn = {"name": test.fn, "args": test.args, "kwargs": test.kwargs}
            return self.job_frames(req, limits, fn=fn)
        return self.job_frames(req, limits, stdin=test.stdin)

    async def read_job(
        self, worker: ZygoteWorker, limits: Limits, lines: bool = False
    ) -> dict[str, Any]:
        """Collect one job's output frames up to its ``end`` frame (``lines``: the side
        channel holds a batch's JSON-lines records)."""
        streams: dict[str, bytearray] = {name: bytearray() for name in wire.STREAMS.values()}
        deadline = limits.wall_s + self.config.grace_s
        while True:
            kind, body = await worker.recv(timeout=deadline)
            if kind == wire.JSON:
                break
            name = wire.STREAMS.get(kind)
            if name is None:
                worker.kill()
                raise WorkerDied(f"sandbox worker sent a {kind!r} frame inside a job")
            streams[name] += body
        end: dict[str, Any] = wire.decode(body)
        if end.get("type") == "error":
            raise WorkerDied(f"sandbox worker failed: {end.get('message')}")
        if lines:
            end["records"] = parse_records(bytes(streams["side"]))
            end["side"] = {}
        else:
            try:
                side = json.loads(bytes(streams["side"]) or b"{}")
            except ValueError:
                side = {"bad_side_channel": True}
            end["side"] = side if isinstance(side, dict) else {"bad_side_channel": True}
        end["stdout"] = streams["stdout"].decode("utf-8", "replace")
        end["stderr"] = streams["stderr"].decode("utf-8", "replace")
        return end

    def compile_limits(self, req: RunRequest | RunTestsRequest) -> Limits:
        """The pool's compile limits, with the wall (and CPU) time lowered to the request's
        ``compile_timeout_s`` where it asks for less; never raised above the pool's."""
        limits = self.config.compile_limits
        if req.compile_timeout_s is None:
            return limits
        wall = min(req.compile_timeout_s, limits.wall_s)
        cpu = min(wall, limits.effective_cpu_s())
        return limits.model_copy(update={"wall_s": wall, "cpu_s": cpu})

    async def compiled(
        self, worker: ZygoteWorker, req: RunRequest | RunTestsRequest
    ) -> RunResult | None:
        """Read the compile step's reply (C++); a result when compilation failed."""
        step = await self.compile_step(worker, req)
        return step if step is not None and not step.compiled else None

    async def compile_step(
        self, worker: ZygoteWorker, req: RunRequest | RunTestsRequest
    ) -> RunResult | None:
        """The compile step's reply (compiled languages) as a result with ``compiled`` and
        ``compile_s`` set (callers such as SandboxFusion's ``compile_result`` report a success
        too); None for languages without one."""
        if not language_spec(req.language, self.config).compiled:
            return None
        limits = self.compile_limits(req)
        raw = await self.read_job(worker, limits)
        wall_s = raw.get("wall_s", 0.0)
        if raw.get("compiled"):
            return RunResult(status=RunStatus.OK, compiled=True, compile_s=wall_s)
        if "sandbox_error" in raw:
            raise WorkerDied(raw["sandbox_error"])
        status = RunStatus.TIMEOUT if raw.get("timed_out") else RunStatus.COMPILE_ERROR
        return RunResult(
            status=status,
            stderr=raw.get("stderr", ""),
            exit_code=raw.get("exit_code"),
            wall_s=wall_s,
            cpu_s=raw.get("cpu_s", 0.0),
            compiled=False,
            compile_s=wall_s,
            error="compilation failed" if status is RunStatus.COMPILE_ERROR else "compile timeout",
        )

    async def read_fetch(self, worker: ZygoteWorker) -> dict[str, Any]:
        """Files of the request's last program, then the end of the request."""
        files: dict[str, Any] = {}
        while True:
            msg = await worker.recv_json(timeout=self.config.grace_s + 5.0)
            if msg.get("type") == "fetched":
                return files
            if msg.get("type") == "error":
                raise WorkerDied(f"sandbox worker failed: {msg.get('message')}")
            name = msg["name"]
            if msg.get("error"):
                files[name] = {"error": msg["error"]}
                continue
            kind, body = await worker.recv(timeout=self.config.grace_s + 5.0)
            if kind != wire.FILE:
                worker.kill()
                raise WorkerDied(f"sandbox worker sent a {kind!r} frame for a file")
            files[name] = {
                "content_b64": base64.b64encode(body).decode(),
                "truncated": msg.get("truncated", False),
            }
