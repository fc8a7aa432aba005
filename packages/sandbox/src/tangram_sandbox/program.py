"""The program process (P): one per execution, pid 1 of its own pid namespace.

P is forked by the zygote *before* its job exists, as a spare: as root it mounts its private
``/tmp``, ``/dev/shm`` and ``/proc``, then sheds every privilege (slot uid, no_new_privs, a user
namespace of its own, seccomp) and waits on fd 4. The job arrives there (the zygote splices it
from the pool's socket without reading it); P writes the input files itself, as the slot uid,
lowers its rlimits to the job's, and runs the program: Python in this already-warm
interpreter, every other language (and every compiler) through ``execve`` of the argv that
the pool built from :mod:`tangram_sandbox.languages`.

Fds of P: 0 stdin (a memfd P fills), 1 stdout, 2 stderr, 3 the side channel to the pool (a
function test's return value, or how set-up failed), 4 the job (closed once read).
Stdlib-only: it runs under the system interpreter.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import io
import json
import os
import resource
import signal
import sys
import time
import traceback
import types
from typing import Any, NoReturn

from tangram_sandbox import _sys, wire

__all__ = ["PROGRAM_ENV", "SETUP_FAILED", "STATUS_FD", "WORKDIR", "spare_main"]

WORKDIR = "/tmp/work"
SETUP_FAILED = 126
#: P's trusted channel to the zygote: ``r`` (mounts ready), then ``g``, the program's start in
#: CLOCK_MONOTONIC nanoseconds and a newline (the program starts), or ``E`` and a message
#: (set-up failed). Closed before any program code runs, so a program cannot claim an
#: infrastructure failure (a trainer would drop, not score, such a sample), nor move its own
#: start.
STATUS_FD = 5
PROGRAM_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
_SOURCE = {"python": "main.py", "cpp": "main.cpp", "bash": "main.sh"}
#: A plain int: an enum member passed through ctypes touches more of the interpreter's pages,
#: and every page P writes is one it copies (see :mod:`tangram_sandbox.zygote`).
_SIGKILL = int(signal.SIGKILL)
_RMID_FORCED = "/proc/sys/kernel/shm_rmid_forced"


def _enter_sandbox(cfg: dict[str, Any], fds: dict[str, int]) -> None:
    """As root: private mounts, then shed every privilege, in this order.

    The mounts need root; then the uid drop; then no_new_privs, the user namespace (which
    leaves no capability outside it) and seccomp, last because it forbids ``unshare``."""
    # Should the zygote die before this line, P still ends: its job pipe reads end-of-file.
    # (Set again after each credential change below: the kernel clears it on setresuid.)
    _sys.set_pdeathsig(_SIGKILL)
    os.setsid()
    apply = cfg["apply"]
    # A fresh IPC namespace per execution, not per worker: SysV shared memory, semaphores and
    # message queues, and POSIX message queues, outlive the process that made them, so with
    # one namespace per worker the next run could read them and pay their memory charge.
    # They are destroyed with the namespace, when this program's last process is gone.
    fresh_ipc = _sys.CLONE_NEWIPC if apply.get("ipc_ns") else 0
    _sys.unshare(_sys.CLONE_NEWNS | fresh_ipc)
    nosuid = _sys.MS_NOSUID | _sys.MS_NODEV
    _sys.mount(b"tmpfs", b"/tmp", b"tmpfs", nosuid, cfg["tmp_mount_data"])
    if cfg["has_dev_shm"]:
        _sys.mount(b"tmpfs", b"/dev/shm", b"tmpfs", nosuid, b"size=64m,mode=1777")
    if fresh_ipc and cfg["has_dev_mqueue"]:  # the host's queue names, else
        _sys.mount(b"mqueue", b"/dev/mqueue", b"mqueue", nosuid | _sys.MS_NOEXEC)
    if apply["pid_ns"]:  # a /proc that shows this pid namespace only
        _sys.mount(b"proc", b"/proc", b"proc", nosuid | _sys.MS_NOEXEC)
    if fresh_ipc:
        # Orphaned SysV shared memory is destroyed as its last process exits, not later with
        # the namespace (an RCU-deferred work item): the slot's memory charge is gone before
        # the next run starts. Per IPC namespace; best effort where /proc is read-only.
        with contextlib.suppress(OSError):
            fd = os.open(_RMID_FORCED, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
    os.mkdir(WORKDIR, 0o700)
    if apply["slot_uid"]:
        os.chown(WORKDIR, cfg["uid"], cfg["gid"])
    else:  # rootless: the program is the pool's own uid; hide that uid's files (and cgroups)
        hidden = nosuid | _sys.MS_RDONLY | _sys.MS_NOEXEC
        for path in [*cfg.get("hide", ()), *cfg["cgroup_dirs"].values()]:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
                _sys.mount("tmpfs", path, "tmpfs", hidden, "size=4k,mode=0")
    os.write(fds["status"], b"r")  # the zygote may now take hold of our working directory
    for target, name in enumerate(("stdin", "stdout", "stderr", "result", "go", "status")):
        os.dup2(fds[name], target)
    os.set_inheritable(STATUS_FD, False)
    os.closerange(STATUS_FD + 1, 1 << 16)
    os.chdir(WORKDIR)
    if apply["slot_uid"]:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _sys.set_no_new_privs()  # (no core dumps: the zygote's RLIMIT_CORE, 0, is inherited)
    if apply["user_ns"]:
        _sys.unshare(_sys.CLONE_NEWUSER)
    _sys.set_pdeathsig(_SIGKILL)  # cleared by the credential changes above
    if apply["seccomp"]:
        cfg["seccomp"].install()
    # The environment is already the programs' own (the zygote's is exactly PROGRAM_ENV):
    # nothing to set here.


def _apply_limits(limits: dict[str, Any], address_space_mb: int | None = None) -> None:
    """The job's rlimits; only ever lowered from what P inherited, so no privilege is needed.

    RLIMIT_AS is ``memory_mb``, or ``address_space_mb`` where the pool sets one: the JVM and
    V8 reserve address space they never touch, so their jobs get headroom there and bound
    their heap with their own flag (see :mod:`tangram_sandbox.languages`)."""
    mem = int(address_space_mb or limits["memory_mb"]) << 20
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))
    fsize = int(limits["file_size_mb"]) << 20
    for res, soft, hard in (
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, int(limits["open_files"]), int(limits["open_files"])),
        (resource.RLIMIT_NPROC, int(limits["processes"]), int(limits["processes"])),
    ):
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))


def _safe_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        raise ValueError(f"file name {name!r} must be a relative path inside the working dir")
    return parts


def _write_inputs(job: dict[str, Any]) -> None:
    """The job's files and its source, written by P itself (as the slot uid)."""
    for name, b64 in (job.get("files") or {}).items():
        parts = _safe_parts(name)
        if len(parts) > 1:
            os.makedirs("/".join(parts[:-1]), exist_ok=True)
        _write_file("/".join(parts), base64.b64decode(b64))
    source = job.get("source") or _SOURCE[job["language"]]
    _write_file("/".join(_safe_parts(source)), job["code"].encode())
    data = job.get("stdin")
    if data:  # else fd 0 stays the zygote's /dev/null: the same end of file, for less work
        stdin = os.memfd_create("stdin", 0)
        wire.write_all(stdin, data.encode())
        os.lseek(stdin, 0, os.SEEK_SET)
        os.dup2(stdin, 0)
        os.close(stdin)


def _write_file(path: str, data: bytes) -> None:
    """``open(path, "wb").write(data)`` without the io stack: the file objects, and the codec
    lookup of text mode, are pages of the zygote this process would copy."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        wire.write_all(fd, data)
    finally:
        os.close(fd)


def _report(obj: dict[str, Any]) -> None:
    """The side channel (fd 3): a function test's return value, or how the program failed."""
    with contextlib.suppress(OSError):
        os.write(3, json.dumps(obj).encode())


def _make_stdio() -> tuple[Any, Any, Any]:
    return (
        io.TextIOWrapper(
            io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace"
        ),
        io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="replace"
        ),
        io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        ),
    )


#: ``sys.std*`` objects the zygote made for its programs and never used (see premake_stdio).
_UNUSED_STDIO: list[tuple[Any, Any, Any]] = []
#: The zygote's own ``sys.std*`` objects, kept alive: dropped by a program's process when it
#: binds its own, they were freed there, and their finalisers (a flush, a close) wrote ~30
#: pages that process then copied.
_ZYGOTE_STDIO: list[Any] = []


def premake_stdio() -> None:
    """In the zygote, once: a program's ``sys.std*`` objects, made before any fork.

    Why: made in the program's process, the first text stream alone cost ~30 copied pages
    (the codec lookup and the classes it instantiates); made here, each program's process
    takes (its copy of) these, untouched. A stream records at its creation whether its fd is
    seekable, and a program's fds 1 and 2 are pipes (its 0 a memfd, seekable like the
    zygote's /dev/null): so they are made over a pipe, and our own fds put back."""
    _ZYGOTE_STDIO.extend((sys.stdin, sys.stdout, sys.stderr))
    r, w = os.pipe()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(w, 1)
        os.dup2(w, 2)
        _UNUSED_STDIO.append(_make_stdio())
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (r, w, *saved):
            os.close(fd)


def bind_stdio() -> None:
    """Fresh ``sys.std*`` objects over fds 0-2 (the zygote's own may hold buffered bytes): the
    zygote's unused ones the first time in a process, new ones after that."""
    streams = _UNUSED_STDIO.pop() if _UNUSED_STDIO else _make_stdio()
    sys.stdin = sys.__stdin__ = streams[0]  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = streams[1]  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = streams[2]  # type: ignore[misc]


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def compile_program(code: str) -> Any:
    """The code object, or ``None`` after printing the syntax error to stderr."""
    try:
        return compile(code, "main.py", "exec")
    except (SyntaxError, ValueError) as exc:
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exception(exc, limit=0)
        return None


def exec_program(
    compiled: Any, fn: dict[str, Any] | None, passthrough: tuple[type[BaseException], ...] = ()
) -> tuple[int, dict[str, Any]]:
    """Run the program as ``__main__`` with fresh globals, then call ``fn`` if given.

    Returns the exit status and the side-channel facts (a function's return value, a memory
    error). Exceptions in ``passthrough`` (the batch harness's timeout) propagate."""
    side: dict[str, Any] = {}
    status = 0
    main = types.ModuleType("__main__")
    main.__dict__.update({"__builtins__": builtins, "__file__": f"{WORKDIR}/main.py"})
    sys.modules["__main__"] = main
    try:
        exec(compiled, main.__dict__)
        if fn is not None:
            target = main.__dict__.get(fn["name"])
            if not callable(target):
                raise NameError(f"the code defines no function named {fn['name']!r}")
            value = target(*fn.get("args", []), **fn.get("kwargs", {}))
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"return value is not JSON-serialisable: {exc}") from None
            side["return"] = value
    except passthrough:
        raise
    except SystemExit as exc:
        code_ = exc.code
        status = code_ if isinstance(code_, int) else (0 if code_ is None else 1)
        if not isinstance(code_, int | None):
            with contextlib.suppress(OSError, ValueError):
                print(code_, file=sys.stderr)
    except MemoryError:
        side["memory_error"] = True
        status = 1
        # What Python itself would print; a raw write, since there may be no memory to format
        # a traceback with.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(2, b"MemoryError\n")
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):  # stderr may be closed or flooded
            traceback.print_exception(exc)
        status = 1
    return status & 0xFF, side


def _run_python(code: str, job: dict[str, Any], sys_path: list[str]) -> int:
    """Run ``code`` as ``__main__`` in this (forked, warm) interpreter; the exit status."""
    sys.argv = ["main.py"]
    sys.path[:] = [WORKDIR, *sys_path]
    bind_stdio()
    compiled = compile_program(code)
    if compiled is None:
        flush_stdio()
        _report({"compile_error": True})
        return 1
    status, side = exec_program(compiled, job.get("fn"))
    flush_stdio()
    if side:
        _report(side)
    return status


def _setup_failed(exc: BaseException) -> NoReturn:
    with contextlib.suppress(OSError):
        os.write(STATUS_FD, b"E" + repr(exc).encode(errors="replace")[:2000])
    os._exit(SETUP_FAILED)


def spare_main(cfg: dict[str, Any], fds: dict[str, int]) -> None:
    """Body of P; never returns."""
    try:
        _enter_sandbox(cfg, fds)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.dup2(fds["status"], STATUS_FD)
        _setup_failed(exc)
    job: dict[str, Any] = {}
    try:
        frame = wire.read_frame(4)
        os.close(4)
        if frame is None:  # the zygote is done with this spare
            os._exit(0)
        job = frame
        _write_inputs(job)
        if job.get("env"):  # the language's (GOCACHE, MALLOC_ARENA_MAX)
            os.environ.update(job["env"])
        _apply_limits(job["limits"], job.get("address_space_mb"))
        # "g" and the program's start: the zygote's clock for the wall limit starts here
        os.write(STATUS_FD, b"g%d\n" % time.monotonic_ns())
        os.close(STATUS_FD)
    except BaseException as exc:
        _setup_failed(exc)
    status = 1
    try:
        if job.get("tests") is not None:
            from tangram_sandbox.batch import run_batch

            run_batch(job, cfg["sys_path"])
            os._exit(0)
        argv = job.get("argv")
        if argv:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            os.execve(argv[0], argv, dict(os.environ))
        status = _run_python(job["code"], job, cfg["sys_path"])
    except BaseException as exc:  # the program's doing (or its output's): a runtime error
        with contextlib.suppress(OSError, ValueError):
            os.write(2, f"\n{exc!r}\n".encode(errors="replace"))
    os._exit(status)
