"""Many test cases in one sandboxed program process: the fast path of ``run_tests``.

Why: creating a sandbox (a fork, namespaces, mounts, then exit) costs milliseconds of CPU on a
VM, far more than running a typical test case. In a batch, one program process runs every
test of a request in turn: Python tests in this warm interpreter with fresh ``__main__``
globals and fresh stdin/stdout each time; tests of every other language each in a child spawned with
``posix_spawn`` (vfork-fast), in its own session so that a timeout kills it and its children.

What a batch shares that ``isolation="per_test"`` does not: the working directory, the
process's own state (modules imported, ``sys`` settings) for Python tests, and the namespaces.
Expected outputs are never here (the pool judges), so a program that tampers with later tests'
records can at most report answers it computed itself.

Records go to fd 3 as JSON lines, one per finished test. A program that kills this process
(a crash, ``os._exit``, a timeout it ignores) ends the batch early; the pool reports that test
from the process's fate and runs the rest in a new batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import sys
import time
from typing import Any

from tangram_sandbox import program

__all__ = ["run_batch"]


class _TestTimeout(BaseException):
    """Raised by SIGALRM in a Python test that overran its wall-clock limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _TestTimeout


def _memfd(data: bytes = b"") -> int:
    fd = os.memfd_create("io", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_back(fd: int, cap: int) -> tuple[str, bool]:
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, min(size, cap)) if cap else b""
    os.close(fd)
    return data.decode("utf-8", "replace"), size > cap


def _python_test(compiled: Any, test: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    stdin, out, err = _memfd(test.get("stdin", "").encode()), _memfd(), _memfd()
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    os.close(stdin)
    program.bind_stdio()
    timed_out = False
    side: dict[str, Any] = {}
    status = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, float(limits["wall_s"]))
    try:
        status, side = program.exec_program(compiled, test.get("fn"), (_TestTimeout,))
    except _TestTimeout:
        timed_out = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.monotonic() - start
    program.flush_stdio()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cap = int(limits["output_bytes"])
    stdout, out_cut = _read_back(out, cap)
    stderr, _ = _read_back(err, cap)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "exit_code": status,
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": out_cut,
        "wall_s": wall,
        "cpu_s": cpu,
        "side": side,
    }


def _spawned_test(argv: list[str], test: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    stdin, out, err = _memfd(test.get("stdin", "").encode()), _memfd(), _memfd()
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, err, 2),
    ]
    start = time.monotonic()
    pid = os.posix_spawn(
        argv[0],
        argv,
        dict(os.environ),
        file_actions=actions,
        setsid=True,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM),
    )
    os.close(stdin)
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], float(limits["wall_s"]))
    timed_out = not ready
    if timed_out:
        os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - start
    os.close(pidfd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # whatever it left in its session goes too
    cap = int(limits["output_bytes"])
    stdout, out_cut = _read_back(out, cap)
    stderr, _ = _read_back(err, cap)
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": out_cut,
        "wall_s": wall if not timed_out else float(limits["wall_s"]),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024.0,
        "side": {},
    }


def _emit(record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(3, view) :]


def run_batch(job: dict[str, Any], sys_path: list[str]) -> None:
    """Run ``job["tests"]`` (starting at index ``job["first"]``), one record per test."""
    os.set_inheritable(3, False)  # spawned programs must not write records
    limits = job["test_limits"]
    first = int(job.get("first", 0))
    argv = job.get("argv")
    compiled = None
    if not argv:
        sys.argv = ["main.py"]
        sys.path[:] = [program.WORKDIR, *sys_path]
        signal.signal(signal.SIGALRM, _on_alarm)
        err = _memfd()
        os.dup2(err, 2)
        program.bind_stdio()
        compiled = program.compile_program(job["code"])
        if compiled is None:
            program.flush_stdio()
            stderr, _ = _read_back(err, int(limits["output_bytes"]))
            _emit({"i": first, "exit_code": 1, "stderr": stderr, "side": {"compile_error": True}})
            return
        os.close(err)
    for offset, test in enumerate(job["tests"]):
        record = _spawned_test(argv, test, limits) if argv else _python_test(compiled, test, limits)
        record["i"] = first + offset
        _emit(record)
