"""Requests, limits and results of the sandbox API: the edge where user input is validated.

Every request is a pydantic model with ``extra="forbid"``, so a misspelt field is an error that
names it, not a silently ignored setting. Limits in a request are clamped to the pool's maxima
(:meth:`Limits.clamp`), so a client cannot ask for more than the operator allows.
"""

from __future__ import annotations

import base64
import enum
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tangram_core.actions import ActionResult, ActionStatus

__all__ = [
    "CallTest",
    "Language",
    "Limits",
    "RunRequest",
    "RunResult",
    "RunStatus",
    "RunTestsRequest",
    "RunTestsResult",
    "StdinTest",
    "TestVerdict",
    "check_path",
    "outputs_match",
    "values_match",
]

#: SandboxFusion's names; how each compiles and runs is in :mod:`tangram_sandbox.languages`.
Language = Literal["python", "cpp", "c", "java", "nodejs", "typescript", "go", "rust", "bash"]


class RunStatus(enum.StrEnum):
    """How an execution ended. ``sandbox_error`` is the infrastructure's failure, never the
    program's: a trainer must not score it as 0 (retry it, or drop the sample)."""

    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    COMPILE_ERROR = "compile_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    SANDBOX_ERROR = "sandbox_error"


class Limits(BaseModel):
    """Resource limits of one execution (one test case, for ``run_tests``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    wall_s: float = Field(10.0, gt=0, le=3600, description="Wall-clock limit.")
    cpu_s: float | None = Field(
        None, gt=0, le=3600, description="CPU-time limit (RLIMIT_CPU); defaults to wall_s."
    )
    memory_mb: int = Field(
        1024, ge=32, le=1 << 20, description="Address space (RLIMIT_AS) and cgroup memory."
    )
    processes: int = Field(64, ge=1, le=4096, description="Processes of the slot uid.")
    open_files: int = Field(256, ge=16, le=1 << 16, description="RLIMIT_NOFILE.")
    file_size_mb: int = Field(64, ge=0, le=1 << 16, description="Largest file written.")
    output_bytes: int = Field(
        1 << 20, ge=0, le=1 << 28, description="stdout and stderr kept, each; then truncated."
    )

    def effective_cpu_s(self) -> float:
        return self.cpu_s if self.cpu_s is not None else self.wall_s

    def clamp(self, maximum: Limits) -> Limits:
        """Each limit capped at the server's maximum."""
        return Limits(
            wall_s=min(self.wall_s, maximum.wall_s),
            cpu_s=min(self.effective_cpu_s(), maximum.effective_cpu_s()),
            memory_mb=min(self.memory_mb, maximum.memory_mb),
            processes=min(self.processes, maximum.processes),
            open_files=min(self.open_files, maximum.open_files),
            file_size_mb=min(self.file_size_mb, maximum.file_size_mb),
            output_bytes=min(self.output_bytes, maximum.output_bytes),
        )

    def wire(self) -> dict[str, Any]:
        return dict(self.model_dump(), cpu_s=self.effective_cpu_s())


#: Linux's limits on one path component and on a whole path, in bytes.
_NAME_MAX = 255
_PATH_MAX = 4096
#: The programs' own files: each language's source (Java's default), and ``main``, the output
#: of a compile step.
_RESERVED = (
    "main.py",
    "main.cpp",
    "main.c",
    "Main.java",
    "main.js",
    "main.ts",
    "main.go",
    "main.rs",
    "main.sh",
    "main",
)


def check_path(name: str) -> str:
    """A file path inside the working directory, or a ``ValueError`` naming what is wrong.

    Strict on purpose: the path must already be in normal form (no ``.``, ``..`` or empty
    component, no leading ``/``), so that two spellings can never name one file and a bad
    name is the client's 422, not a failure inside the sandbox that clients would retry."""
    if not name:
        raise ValueError("file name must not be empty")
    if "\x00" in name:
        raise ValueError(f"file name {name!r} contains a NUL character")
    if len(name.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise ValueError(f"file name {name[:40]!r}... is longer than {_PATH_MAX} bytes")
    if name.startswith("/"):
        raise ValueError(f"file name {name!r} must be relative to the working directory")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"file name {name!r} has an empty, '.' or '..' component: "
                "write the path in normal form, inside the working directory"
            )
        if len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX:
            raise ValueError(f"file name {name!r} has a component longer than {_NAME_MAX} bytes")
    return name


def _check_files(files: dict[str, str]) -> dict[str, str]:
    for name, content in files.items():
        check_path(name)
        if name in _RESERVED:
            raise ValueError(f"file name {name!r} is reserved for the program itself")
        try:
            base64.b64decode(content, validate=True)
        except ValueError as exc:
            raise ValueError(f"file {name!r} is not valid base64: {exc}") from None
    # A path that is also another path's directory cannot be both a file and a folder.
    names = set(files)
    for name in files:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in names:
                raise ValueError(
                    f"file names {parent!r} and {name!r} conflict: {parent!r} cannot be both "
                    "a file and a directory"
                )
    return files


class _CodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., max_length=1 << 20, description="The program's source.")
    language: Language = "python"
    files: dict[str, str] = Field(
        default_factory=dict, description="Extra files for the working directory, base64."
    )
    limits: Limits = Field(default_factory=Limits)
    compile_timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="Wall-clock limit of the compile step (compiled languages); defaults to "
        "the pool's compile_limits.wall_s and is clamped to it.",
    )

    @field_validator("files")
    @classmethod
    def _valid_files(cls, files: dict[str, str]) -> dict[str, str]:
        return _check_files(files)


class RunRequest(_CodeRequest):
    """One execution: ``run(code, language, stdin, files, limits)``."""

    stdin: str = Field("", max_length=1 << 26)
    fetch_files: list[str] = Field(
        default_factory=list, max_length=64, description="Files to return after the run."
    )

    @field_validator("fetch_files")
    @classmethod
    def _valid_fetch(cls, names: list[str]) -> list[str]:
        return [check_path(name) for name in names]


class StdinTest(BaseModel):
    """Feed ``stdin``; pass when stdout equals ``expected_stdout`` (trailing spaces ignored)."""

    model_config = ConfigDict(extra="forbid")
    stdin: str = Field("", max_length=1 << 26)
    expected_stdout: str = Field(..., max_length=1 << 26)


class CallTest(BaseModel):
    """Call ``fn(*args, **kwargs)`` after running the code; pass when it returns ``expected``
    (JSON values; floats within ``rel_tol``)."""

    model_config = ConfigDict(extra="forbid")
    fn: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    expected: Any = None


class RunTestsRequest(_CodeRequest):
    """A whole batch of test cases against one program, in one request."""

    tests: list[StdinTest | CallTest] = Field(..., min_length=1, max_length=10_000)
    stop_on_first_failure: bool = False
    isolation: Literal["batch", "per_test"] = Field(
        "batch",
        description="'batch': one sandbox runs every test in turn (Python tests with fresh "
        "globals in one warm interpreter, other languages' tests as child processes), several "
        "times faster; 'per_test': a fresh sandbox (process, namespaces, /tmp) for each test.",
    )
    rel_tol: float = Field(1e-6, ge=0, le=1)

    @model_validator(mode="after")
    def _calls_need_python(self) -> RunTestsRequest:
        if self.language != "python" and any(isinstance(t, CallTest) for t in self.tests):
            raise ValueError(f"function-call tests need language='python', not {self.language!r}")
        return self


class RunResult(BaseModel):
    """The outcome of one execution."""

    status: RunStatus
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, str] = Field(default_factory=dict, description="Fetched files, base64.")
    files_truncated: list[str] = Field(
        default_factory=list,
        description="Fetched files larger than the fetch limit: `files` holds their first bytes.",
    )
    compiled: bool | None = Field(
        None,
        description="Compiled languages: True when the program compiled (a cached binary "
        "counts); False when the compile step failed or timed out, and then exit_code, stderr "
        "and wall_s are the compiler's and nothing ran. None where nothing is compiled.",
    )
    compile_s: float | None = Field(
        None, description="Wall seconds of the compile step; 0 when the binary was cached."
    )
    error: str | None = Field(None, description="Why, for compile and sandbox errors.")
    queue_wait_s: float = 0.0

    @classmethod
    def from_action(cls, result: ActionResult) -> RunResult | None:
        """The run a ``sandbox.run`` action's result carries; ``None`` when the action ended
        without one (it never reached a worker, or the worker was lost past its retries:
        ``result.status`` and ``result.error`` say why)."""
        if result.status is not ActionStatus.OK or not isinstance(result.output, dict):
            return None
        return cls.model_validate(result.output)


class TestVerdict(BaseModel):
    """One test case's verdict."""

    index: int
    passed: bool
    status: RunStatus
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    message: str | None = None


class RunTestsResult(BaseModel):
    """Per-test verdicts plus the pass fraction. ``status`` is ``ok`` when every test ran
    (passed or not), ``compile_error`` when nothing could run, ``sandbox_error`` when the
    infrastructure failed (then ``pass_fraction`` must not be used as a reward)."""

    status: RunStatus
    passed: int
    total: int
    pass_fraction: float
    verdicts: list[TestVerdict]
    error: str | None = None
    wall_s: float = 0.0
    queue_wait_s: float = 0.0

    @classmethod
    def from_action(cls, result: ActionResult) -> RunTestsResult | None:
        """The verdicts a ``sandbox.run_tests`` action's result carries; ``None`` as for
        :meth:`RunResult.from_action`."""
        if result.status is not ActionStatus.OK or not isinstance(result.output, dict):
            return None
        return cls.model_validate(result.output)


def outputs_match(actual: str, expected: str) -> bool:
    """Judge-style comparison: equal line by line, ignoring trailing whitespace and blank
    trailing lines (what Codeforces-style checkers and SandboxFusion accept)."""
    a = [line.rstrip() for line in actual.rstrip().splitlines()]
    e = [line.rstrip() for line in expected.rstrip().splitlines()]
    return a == e


def values_match(actual: Any, expected: Any, rel_tol: float = 1e-6) -> bool:
    """JSON-value equality, with floats compared to ``rel_tol`` (and 1e-9 absolute)."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        return math.isclose(actual, expected, rel_tol=rel_tol, abs_tol=1e-9)
    if isinstance(actual, list) and isinstance(expected, list | tuple):
        return len(actual) == len(expected) and all(
            values_match(a, e, rel_tol) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            values_match(actual[k], expected[k], rel_tol) for k in actual
        )
    return bool(actual == expected)
