"""Verdicts: how a worker's raw report becomes a run's result or a test's verdict.

Why apart from the pool: this is the part that decides what a program did (and whose fault a
failure was: the program's, its limits', or the infrastructure's), on data the program partly
controls (its side channel, its output). It does no I/O, so every rule is testable on a dict.
Expected outputs are compared here, in the pool's process: they never enter a sandbox.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from tangram_sandbox.languages import out_of_memory
from tangram_sandbox.models import (
    CallTest,
    Limits,
    RunResult,
    RunStatus,
    RunTestsResult,
    TestVerdict,
    outputs_match,
    values_match,
)

_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "i": int,
    "exit_code": int,
    "timed_out": bool,
    "stdout": str,
    "stderr": str,
    "stdout_truncated": bool,
    "wall_s": (int, float),
    "cpu_s": (int, float),
    "side": dict,
}


def parse_records(data: bytes) -> list[dict[str, Any] | None]:
    """A batch's JSON-lines records. The program shares the channel, so anything malformed
    ends the list with ``None`` (judged as the program's fault, never the sandbox's)."""
    records: list[dict[str, Any] | None] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or any(
            key in record and not isinstance(record[key], kind)
            for key, kind in _RECORD_TYPES.items()
        ):
            records.append(None)
            break
        records.append(record)
    return records


def not_compiled(compiled: RunResult, total: int, wait: float) -> RunTestsResult:
    """A batch whose program never compiled: no test ran, so no verdicts."""
    return RunTestsResult(
        status=compiled.status,
        passed=0,
        total=total,
        pass_fraction=0.0,
        verdicts=[],
        error=compiled.error,
        queue_wait_s=wait,
    )


def classify(raw: dict[str, Any], limits: Limits) -> tuple[RunStatus, str | None]:
    side = raw.get("side") or {}
    if "sandbox_error" in raw:
        return RunStatus.SANDBOX_ERROR, str(raw["sandbox_error"])
    if raw.get("skipped"):
        return RunStatus.COMPILE_ERROR, str(raw["skipped"])
    if raw.get("timed_out"):
        return RunStatus.TIMEOUT, f"wall-clock limit of {limits.wall_s:g} s exceeded"
    code = raw.get("exit_code")
    # The side channel is the program's own: a claim in it only explains a failure.
    if (side.get("memory_error") and code != 0) or raw.get("oom_killed"):
        return RunStatus.MEMORY_LIMIT, f"memory limit of {limits.memory_mb} MiB exceeded"
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and raw.get("cpu_s", 0.0) >= (
        0.9 * limits.effective_cpu_s()
    ):
        return RunStatus.TIMEOUT, f"CPU-time limit of {limits.effective_cpu_s():g} s exceeded"
    if raw.get("killed_outside"):
        return RunStatus.SANDBOX_ERROR, (
            "the program's process was killed with SIGKILL from outside the sandbox (not by "
            "the program, its limits or the pool; an operator, or the host out of memory): "
            "an infrastructure failure, retry it"
        )
    if side.get("compile_error") and code != 0:
        return RunStatus.COMPILE_ERROR, "syntax error"
    if code == 0:
        return RunStatus.OK, None
    if out_of_memory(raw.get("stderr", "")):
        return RunStatus.MEMORY_LIMIT, f"memory limit of {limits.memory_mb} MiB exceeded"
    return RunStatus.RUNTIME_ERROR, None


def to_result(raw: dict[str, Any], limits: Limits) -> RunResult:
    status, error = classify(raw, limits)
    return RunResult(
        status=status,
        stdout=raw.get("stdout", ""),
        stderr=raw.get("stderr", ""),
        exit_code=raw.get("exit_code"),
        wall_s=raw.get("wall_s", 0.0),
        cpu_s=raw.get("cpu_s", 0.0),
        max_rss_mb=raw.get("max_rss_mb", 0.0),
        stdout_truncated=raw.get("stdout_truncated", False),
        stderr_truncated=raw.get("stderr_truncated", False),
        error=error,
    )


def judge(
    index: int, test: Any, raw: dict[str, Any], limits: Limits, rel_tol: float
) -> TestVerdict:
    status, error = classify(raw, limits)
    passed = False
    message = error
    if status is RunStatus.OK:
        if isinstance(test, CallTest):
            side = raw.get("side") or {}
            if "return" not in side:
                status, message = RunStatus.RUNTIME_ERROR, "the function returned nothing"
            else:
                passed = values_match(side["return"], test.expected, rel_tol)
                message = None if passed else f"returned {side['return']!r}"
        else:
            passed = not raw.get("stdout_truncated") and outputs_match(
                raw.get("stdout", ""), test.expected_stdout
            )
            message = None if passed else "wrong answer"
    return TestVerdict(
        index=index,
        passed=passed,
        status=status,
        stdout=raw.get("stdout", "")[:4096],
        stderr=raw.get("stderr", "")[-4096:],
        wall_s=raw.get("wall_s", 0.0),
        cpu_s=raw.get("cpu_s", 0.0),
        message=message,
    )


def run_tests_result(
    verdicts: list[TestVerdict],
    total: int,
    wait: float,
    wall_s: float,
    *,
    stop_on_first_failure: bool = False,
) -> RunTestsResult:
    """The result of tests that ran; with early stop, the verdicts after the first failure are
    dropped (a batch process or a parallel share may have run past it)."""
    if stop_on_first_failure:
        first_bad = next((i for i, v in enumerate(verdicts) if not v.passed), None)
        if first_bad is not None:
            verdicts = verdicts[: first_bad + 1]
    passed = sum(v.passed for v in verdicts)
    return RunTestsResult(
        status=RunStatus.OK,
        passed=passed,
        total=total,
        pass_fraction=passed / total,
        verdicts=verdicts,
        queue_wait_s=wait,
        wall_s=wall_s,
    )


def merge_shares(
    parts: list[RunTestsResult], bounds: list[int], *, stop_on_first_failure: bool
) -> RunTestsResult:
    """The result one worker would have given for tests run in contiguous shares
    (``bounds[i]:bounds[i+1]`` on share ``i``): verdicts in test order, early stop applied
    across shares, and the first share that did not run (compile error, sandbox error) as the
    whole result, since no verdict of the others holds without it."""
    total = bounds[-1]
    wall = max(p.wall_s for p in parts)
    wait = max(p.queue_wait_s for p in parts)
    for part in parts:
        if part.status is not RunStatus.OK:
            return part.model_copy(
                update={"total": total, "passed": 0, "pass_fraction": 0.0, "verdicts": []}
            )
    verdicts = [
        v.model_copy(update={"index": v.index + lo})
        for part, lo in zip(parts, bounds, strict=False)
        for v in part.verdicts
    ]
    return run_tests_result(
        verdicts, total, wait, wall, stop_on_first_failure=stop_on_first_failure
    )
