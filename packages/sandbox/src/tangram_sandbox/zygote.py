"""The zygote: one warm sandbox worker, and the supervisors it forks for each execution.

Process tree for one request (the pool talks to the zygote over a socket)::

    zygote  root; own mount (read-only view), net, ipc and uts namespaces; joined the slot's
     │      cgroups once at start; interpreter and common stdlib modules warm; never reads a
     │      request itself, so its memory holds nothing of any execution
     └ S    supervisor, one per request: reads the request, enters a new mount namespace with
       │    a private tmpfs /tmp and /dev/shm, writes the files, then runs each job: a new
       │    pid namespace, one fork, output captured within caps and deadlines
       └ P  the program, pid 1 of its own pid namespace: mounts its /proc, then sheds
            privileges (slot uid, no_new_privs, rlimits, own user namespace, seccomp). Python
            runs the code in this already-warm interpreter; C++ and bash are exec'd

Why this shape: a pid namespace dies with its pid 1, and the kernel then kills every process
in it; making the program itself pid 1 is what guarantees that nothing it starts (daemons,
fork bombs) outlives it, at the cost of a single fork per job. The zygote forks S *before* the
request is read, so the request lives only in S and P: a program can read its own process
memory, and must find there nothing of other executions. Expected outputs never enter the
sandbox at all; the pool compares. Forks dominate the cost (about 1 ms each on a VM), which is
why there are two per execution and no more.

This module is stdlib-only: it runs under the system interpreter, whose stdlib an unprivileged
uid can read. Errors inside the machinery are reported as ``sandbox_error``, never as a result.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gc
import hashlib
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import stat
import sys
import time
import traceback
from typing import Any

from tangram_sandbox import _sys, seccomp, wire

WORKDIR = "/tmp/work"
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
# Modules an RL coding task commonly imports, loaded once in the zygote so executions skip it.
_PRELOAD = [
    "array",
    "bisect",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "io",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "sys",
    "time",
    "types",
    "typing",
    "unicodedata",
]
_SETUP_FAILED = 126
_SECCOMP: list[_sys.SeccompProgram] = []  # built once in the zygote, installed in each program


# --- worker start-up ------------------------------------------------------------------------------


def _enter_worker_namespaces(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enter the namespaces every execution of this worker shares; report each layer."""
    layers: dict[str, Any] = {}
    root = os.geteuid() == 0
    wanted = {
        "mount_ns": _sys.CLONE_NEWNS,
        "net_ns": _sys.CLONE_NEWNET,
        "ipc_ns": _sys.CLONE_NEWIPC,
        "uts_ns": _sys.CLONE_NEWUTS,
    }
    if not root:
        # Rootless: a user namespace in which we are root is what lets us create the others.
        uid, gid = os.geteuid(), os.getegid()
        try:
            _sys.unshare(_sys.CLONE_NEWUSER)
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"0 {gid} 1")
            layers["worker_user_ns"] = True
        except OSError as exc:
            layers["worker_user_ns"] = str(exc)
    for name, flag in wanted.items():
        try:
            _sys.unshare(flag)
            layers[name] = True
        except OSError as exc:
            layers[name] = str(exc)
    if layers["mount_ns"] is True:
        try:
            _sys.make_rprivate()
            _sys.remount_tree_readonly("/")
            layers["readonly_root"] = True
        except OSError as exc:
            layers["readonly_root"] = str(exc)
        for path in [cfg.get("cache_dir"), *cfg.get("cgroup_dirs", {}).values()]:
            if path and layers["readonly_root"] is True:
                _sys.bind_writable(path)
    else:
        layers["readonly_root"] = "needs a mount namespace"
    if layers["uts_ns"] is True:
        _sys.sethostname("sandbox")
    return layers


def _preload() -> None:
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):  # a trimmed stdlib
            __import__(name)


# --- C: the sandboxed program ---------------------------------------------------------------------


def _enter_sandbox(cfg: dict[str, Any], fds: dict[str, int]) -> None:
    """In a spare program process, as root: everything that does not depend on the job.

    Order matters: the namespace mounts need root; then the uid drop; then no_new_privs, the
    user namespace (which leaves no capability outside it) and seccomp, which must come last
    because it forbids ``unshare``."""
    _sys.set_pdeathsig(signal.SIGKILL)
    os.setsid()
    apply = cfg["apply"]
    if apply["pid_ns"]:
        # A /proc showing only this pid namespace, in a private mount table so that the spare
        # for the next job can mount its own while this one still runs.
        _sys.unshare(_sys.CLONE_NEWNS)
        _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
    for target, name in enumerate(("stdin", "stdout", "stderr", "result", "go")):
        os.dup2(fds[name], target)
    os.closerange(5, 1 << 16)
    os.chdir(WORKDIR)
    if apply["slot_uid"]:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _sys.set_no_new_privs()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if apply["user_ns"]:
        _sys.unshare(_sys.CLONE_NEWUSER)
    if apply["seccomp"]:
        _SECCOMP[0].install()
    os.environ.clear()
    os.environ.update(_ENV)


def _apply_limits(limits: dict[str, Any]) -> None:
    """The job's rlimits; only ever lowered from what the spare inherited, so no privilege
    is needed (the spare has none left)."""
    mem = int(limits["memory_mb"]) << 20
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))
    for res, soft, hard in (
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (
            resource.RLIMIT_FSIZE,
            int(limits["file_size_mb"]) << 20,
            int(limits["file_size_mb"]) << 20,
        ),
        (resource.RLIMIT_NOFILE, int(limits["open_files"]), int(limits["open_files"])),
        (resource.RLIMIT_NPROC, int(limits["processes"]), int(limits["processes"])),
    ):
        _cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))


def _report(obj: dict[str, Any]) -> None:
    """C's side channel to B (fd 3): the return value of a function test, or how it failed."""
    with contextlib.suppress(OSError):
        os.write(3, json.dumps(obj).encode())


def _run_python(code: str, job: dict[str, Any], sys_path: list[str]) -> int:
    """Run ``code`` as ``__main__`` in this (forked, warm) interpreter; the exit status."""
    import builtins
    import io
    import types

    sys.argv = ["main.py"]
    sys.path[:] = [WORKDIR, *sys_path]
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace"
    )
    out = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="replace"
    )
    err = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.stdout = sys.__stdout__ = out
    sys.stderr = sys.__stderr__ = err
    status = 0
    try:
        try:
            compiled = compile(code, "main.py", "exec")
        except (SyntaxError, ValueError) as exc:
            traceback.print_exception(exc, limit=0)
            _report({"compile_error": True})
            return 1
        main = types.ModuleType("__main__")
        main.__dict__.update({"__builtins__": builtins, "__file__": f"{WORKDIR}/main.py"})
        sys.modules["__main__"] = main
        exec(compiled, main.__dict__)
        fn = job.get("fn")
        if fn is not None:
            target = main.__dict__.get(fn["name"])
            if not callable(target):
                raise NameError(f"the code defines no function named {fn['name']!r}")
            value = target(*fn.get("args", []), **fn.get("kwargs", {}))
            try:
                encoded = json.dumps({"return": value})
            except (TypeError, ValueError) as exc:
                raise TypeError(f"return value is not JSON-serialisable: {exc}") from None
            os.write(3, encoded.encode())
    except SystemExit as exc:
        code_ = exc.code
        status = code_ if isinstance(code_, int) else (0 if code_ is None else 1)
        if not isinstance(code_, int | None):
            print(code_, file=sys.stderr)
    except MemoryError:
        _report({"memory_error": True})
        status = 1
    except BaseException as exc:
        traceback.print_exception(exc)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status & 0xFF


def _spare_main(cfg: dict[str, Any], fds: dict[str, int]) -> None:
    """Body of a spare program process (P); never returns.

    It is forked and sheds its privileges *before* its job exists, then waits on fd 4 for the
    job: the fork and the isolation set-up are off the request's critical path."""
    try:
        _enter_sandbox(cfg, fds)
    except BaseException as exc:
        try:
            os.write(fds["result"], json.dumps({"setup_error": repr(exc)}).encode())
        finally:
            os._exit(_SETUP_FAILED)
    try:
        go = wire.read_frame(4)
        os.close(4)
        if go is None:  # the supervisor is done with us
            os._exit(0)
        job = go["job"]
        _apply_limits(job["limits"])
    except BaseException as exc:
        _report({"setup_error": repr(exc)})
        os._exit(_SETUP_FAILED)
    status = _SETUP_FAILED
    try:
        argv = job.get("argv")
        if argv:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            os.execve(argv[0], argv, dict(os.environ))
        status = _run_python(go["code"], job, cfg["sys_path"])
    except BaseException as exc:
        _report({"setup_error": repr(exc)})
    os._exit(status)


class _Spare:
    """S's handle on a spare program process: its pid and S's ends of its pipes."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.stdin = os.memfd_create("stdin", 0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe()
        go_r, go_w = os.pipe()
        if cfg["apply"]["pid_ns"]:
            if cfg.get("pid_ns_used"):  # back to our own pid namespace, to unshare a fresh one
                _sys.setns(cfg["own_pid_ns"], _sys.CLONE_NEWPID)
            _sys.unshare(_sys.CLONE_NEWPID)
            cfg["pid_ns_used"] = True
        fds = {"stdin": self.stdin, "stdout": out_w, "stderr": err_w, "result": res_w, "go": go_r}
        self.pid = os.fork()
        if self.pid == 0:
            _spare_main(cfg, fds)
        for fd in (out_w, err_w, res_w, go_r):
            os.close(fd)
        if cfg["apply"]["pid_ns"]:
            # Hold its mount namespace, so that tearing it down (an RCU grace period) happens
            # when S exits after replying, not between the program's exit and the reply.
            cfg.setdefault("held_ns", []).append(os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY))
        self.out, self.err, self.res, self.go = out_r, err_r, res_r, go_w

    def start(self, job: dict[str, Any], code: str) -> None:
        """Hand the job over: stdin into the shared memfd, then the job down the go pipe."""
        data = job.get("stdin", "").encode()
        if data:
            os.write(self.stdin, data)
            os.lseek(self.stdin, 0, os.SEEK_SET)
        with contextlib.suppress(BrokenPipeError):  # it died setting up: its result pipe says why
            wire.write_frame(self.go, {"job": job, "code": code})
        os.close(self.go)
        os.close(self.stdin)


# --- S: running one job -------------------------------------------------------------------------


def _kill_tree(pid: int) -> None:
    """SIGKILL the program: as pid 1 of its namespace its death kills every descendant; the
    process-group kill covers a host without pid namespaces (best effort)."""
    for kill in (os.kill, os.killpg):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _read_cgroup_counter(cfg: dict[str, Any], name: str) -> int:
    """The memory controller's ``oom_kill`` count (v1 ``memory.oom_control``, v2
    ``memory.events``): an increase during a job means the kernel killed it for memory."""
    dirs = cfg["cgroup_dirs"]
    if "memory" in dirs:
        path = os.path.join(dirs["memory"], "memory.oom_control")
    elif "unified" in dirs:
        path = os.path.join(dirs["unified"], "memory.events")
    else:
        return 0
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except OSError:
        pass
    return 0


def _set_cgroup_limits(cfg: dict[str, Any], limits: dict[str, Any]) -> None:
    dirs = cfg["cgroup_dirs"]
    # The slot's cgroup also holds the zygote and S: headroom for them over the program's own.
    mem = (int(limits["memory_mb"]) + 64) << 20
    procs = int(limits["processes"]) + 2
    settings = []
    if "memory" in dirs:
        settings.append((dirs["memory"], "memory.limit_in_bytes", mem))
    if "pids" in dirs:
        settings.append((dirs["pids"], "pids.max", procs))
    if "unified" in dirs:
        settings.append((dirs["unified"], "memory.max", mem))
        settings.append((dirs["unified"], "memory.swap.max", 0))
        settings.append((dirs["unified"], "pids.max", procs))
    for path, name, value in settings:
        try:
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))
        except OSError:
            pass  # e.g. EBUSY lowering below the current usage: the rlimits still hold


def _run_job(cfg: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Fork the program for one job and watch it to the end; raw facts for the pool to judge."""
    limits = job["limits"]
    spare = cfg.pop("spare", None) or _Spare(cfg)
    _set_cgroup_limits(cfg, limits)
    ooms_before = _read_cgroup_counter(cfg, "oom_kill")
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    spare.start(job, cfg["code"])
    pid, out_r, err_r, res_r = spare.pid, spare.out, spare.err, spare.res
    cfg["jobs_left"] = cfg.get("jobs_left", 1) - 1
    if cfg["jobs_left"] > 0:  # the next job's process forks while this one runs
        cfg["spare"] = _Spare(cfg)
    cap = int(limits["output_bytes"])
    bufs: dict[str, bytearray] = {
        "stdout": bytearray(),
        "stderr": bytearray(),
        "result": bytearray(),
    }
    truncated = {"stdout": False, "stderr": False}
    sel = selectors.DefaultSelector()
    for fd, name in ((out_r, "stdout"), (err_r, "stderr"), (res_r, "result")):
        sel.register(fd, selectors.EVENT_READ, name)
    pidfd = os.pidfd_open(pid)
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    deadline = start + float(limits["wall_s"])
    timed_out = False
    wait_status: int | None = None
    rss_kb = 0
    end = start
    while sel.get_map():
        now = time.monotonic()
        timeout = None if wait_status is not None or timed_out else max(0.0, deadline - now)
        events = sel.select(timeout)
        if not events:
            if wait_status is None and not timed_out:
                timed_out = True
                end = time.monotonic()
                _kill_tree(pid)
            continue
        for key, _ in events:
            name = key.data
            if name == "exit":
                _, wait_status, usage = os.wait4(pid, 0)
                end = time.monotonic() if not timed_out else end
                rss_kb = usage.ru_maxrss
                sel.unregister(pidfd)
                os.close(pidfd)
                # Its pid namespace died with it; without one, its process group goes now.
                _kill_tree(pid)
                continue
            chunk = os.read(key.fd, 1 << 16)
            buf = bufs[name]
            limit = cap if name != "result" else wire.MAX_FRAME // 4
            if chunk:
                room = limit - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) <= room:
                    continue
                if name in truncated:
                    truncated[name] = True
            # End of stream, or over the cap: stop reading (the writer then gets EPIPE).
            sel.unregister(key.fd)
            os.close(key.fd)
    if wait_status is None:  # pragma: no cover - the pidfd always fires before the loop ends
        _, wait_status, usage = os.wait4(pid, 0)
        rss_kb = usage.ru_maxrss
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    try:
        side = json.loads(bytes(bufs["result"]) or b"{}")
        if not isinstance(side, dict):
            side = {"bad_result": True}
    except ValueError:
        side = {"bad_result": True}
    return {
        "exit_code": os.waitstatus_to_exitcode(wait_status) if wait_status is not None else None,
        "timed_out": timed_out,
        "oom_killed": _read_cgroup_counter(cfg, "oom_kill") > ooms_before,
        "stdout": bytes(bufs["stdout"]).decode("utf-8", "replace"),
        "stderr": bytes(bufs["stderr"]).decode("utf-8", "replace"),
        "stdout_truncated": truncated["stdout"],
        "stderr_truncated": truncated["stderr"],
        "wall_s": end - start,
        "cpu_s": cpu_s,
        "max_rss_mb": rss_kb / 1024.0,
        "side": side,
    }


def _compile_cpp(cfg: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Compile ``main.cpp`` inside the sandbox, or copy the binary from the cache (root-only)."""
    compiler = cfg["cpp"]["compiler"]
    flags = cfg["cpp"]["flags"]
    key = hashlib.sha256(json.dumps([compiler, flags, cfg["code"]]).encode()).hexdigest()
    cache = cfg["cache_fd"]  # opened by the zygote: each execution's /tmp hides the path
    binary = os.path.join(WORKDIR, "main")
    try:
        src_fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=cache)
    except FileNotFoundError:
        src_fd = -1
    if src_fd >= 0:
        with os.fdopen(src_fd, "rb") as src, open(binary, "wb") as dst:
            shutil.copyfileobj(src, dst)
        _own(binary, cfg, 0o755)
        return {"compiled": True, "cached": True, "stderr": "", "wall_s": 0.0}
    job = dict(job, argv=[compiler, *flags, "main.cpp", "-o", "main"], stdin="")
    cfg["jobs_left"] = cfg.get("jobs_left", 1) + 1  # the compiler is a job of its own
    result = _run_job(cfg, job)
    ok = result["exit_code"] == 0 and not result["timed_out"]
    if ok:
        fd = os.open(binary, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "compiler output is not a regular file")
            tmp = f"{key}.{os.getpid()}.tmp"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700, dir_fd=cache)
            with os.fdopen(os.dup(fd), "rb") as src, os.fdopen(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, key, src_dir_fd=cache, dst_dir_fd=cache)
        finally:
            os.close(fd)
    return dict(result, compiled=ok, cached=False)


def _own(path: str, cfg: dict[str, Any], mode: int) -> None:
    if cfg["apply"]["slot_uid"]:
        os.chown(path, cfg["uid"], cfg["gid"])
    os.chmod(path, mode)


# --- S: the per-request supervisor ----------------------------------------------------------------


def _safe_relpath(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or name.startswith("/"):
        raise ValueError(f"file name {name!r} must be a relative path inside the working dir")
    return parts


def _write_inputs(files: dict[str, str], cfg: dict[str, Any]) -> None:
    for name, b64 in files.items():
        parts = _safe_relpath(name)
        path = WORKDIR
        for part in parts[:-1]:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path)
                _own(path, cfg, 0o700)
        path = os.path.join(path, parts[-1])
        with open(path, "wb") as f:
            f.write(base64.b64decode(b64))
        _own(path, cfg, 0o600 if not name.endswith((".sh", "main")) else 0o700)


def _fetch(names: list[str], limit: int) -> dict[str, Any]:
    """Read files the program left behind, without following links out of the working dir."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            parts = _safe_relpath(name)
        except ValueError as exc:
            out[name] = {"error": str(exc)}
            continue
        dir_fd = os.open(WORKDIR, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = nxt
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    out[name] = {"error": "not a regular file"}
                    continue
                data = os.read(fd, limit + 1)
                out[name] = {
                    "content_b64": base64.b64encode(data[:limit]).decode(),
                    "truncated": len(data) > limit,
                }
            finally:
                os.close(fd)
        except OSError as exc:
            out[name] = {"error": f"{exc.strerror or exc}"}
        finally:
            os.close(dir_fd)
    return out


def _prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """S before its request: private mounts, a fresh working directory, a spare program
    process. All of it happens while the worker is idle, off the request's critical path."""
    _sys.set_pdeathsig(signal.SIGKILL)
    if not cfg["apply"]["mount_ns"]:
        raise OSError(errno.ENOSYS, "the sandbox needs a mount namespace for a private /tmp")
    _sys.unshare(_sys.CLONE_NEWNS)
    tmp_opts = f"size={int(cfg['tmp_size_mb'])}m,mode=1777"
    _sys.mount("tmpfs", "/tmp", "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, tmp_opts)
    if os.path.isdir("/dev/shm"):
        _sys.mount("tmpfs", "/dev/shm", "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, "size=64m")
    os.mkdir(WORKDIR, 0o700)
    _own(WORKDIR, cfg, 0o700)
    cfg = dict(cfg)
    if cfg["apply"]["pid_ns"]:
        cfg["own_pid_ns"] = os.open("/proc/self/ns/pid", os.O_RDONLY)
    cfg["spare"] = _Spare(cfg)
    return cfg


def _serve_request(sock_fd: int, cfg: dict[str, Any], request: dict[str, Any]) -> None:
    """S with its request: write the files, run the jobs as they arrive, fetch files."""
    source_name = {"python": "main.py", "cpp": "main.cpp", "bash": "main.sh"}[request["language"]]
    files = dict(request.get("files") or {})
    files[source_name] = base64.b64encode(request["code"].encode()).decode()
    _write_inputs(files, cfg)
    cfg["code"] = request["code"]
    cfg["jobs_left"] = int(request.get("jobs", 1))
    while True:
        msg = wire.read_frame(sock_fd)
        if msg is None:
            return
        if msg["op"] == "job":
            job = msg["job"]
            if job["kind"] == "compile":
                reply = _compile_cpp(cfg, job)
                cfg["compile_failed"] = not reply["compiled"]
            elif cfg.get("compile_failed"):
                cfg["jobs_left"] -= 1
                reply = {"skipped": "compilation failed"}
            else:
                reply = _run_job(cfg, job)
            wire.write_frame(sock_fd, {"type": "job_result", "result": reply})
        elif msg["op"] == "finish":
            fetched = _fetch(msg.get("fetch") or [], int(msg.get("fetch_limit", 1 << 20)))
            wire.write_frame(sock_fd, {"type": "done", "files": fetched})
            return
        else:
            raise ValueError(f"unknown op {msg['op']!r}")


def _supervisor_main(sock_fd: int, cfg: dict[str, Any], done_w: int) -> None:
    """Body of S; never returns. Tells the zygote, on ``done_w``: ``r`` when it has taken a
    request, ``k`` when it has answered it, ``e`` when the pool closed the socket."""
    try:
        cfg = _prepare(cfg)
        request = wire.read_frame(sock_fd)
    except BaseException:
        traceback.print_exc()  # to the worker's log; no request was taken, none is lost
        os._exit(1)
    if request is None:
        os.write(done_w, b"e")
        os._exit(0)
    os.write(done_w, b"r")
    status = 0
    try:
        _serve_request(sock_fd, cfg, request)
    except BaseException:
        status = 1
        with contextlib.suppress(OSError):
            wire.write_frame(sock_fd, {"type": "error", "message": traceback.format_exc(limit=6)})
    os.write(done_w, b"k")
    os._exit(status)


# --- the zygote's loop ----------------------------------------------------------------------------

_MAX_PREPARE_FAILURES = 3


def serve(sock: socket.socket, cfg: dict[str, Any]) -> None:
    """Keep one prepared supervisor waiting for the next request, until the pool hangs up.

    The zygote never reads the socket: the supervisor, forked before the request exists,
    reads it, so no execution's data ever sits in the zygote's memory (which every later
    execution inherits)."""
    sock_fd = sock.fileno()
    failures = 0
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(done_r)
            _supervisor_main(sock_fd, cfg, done_w)
        os.close(done_w)
        state = os.read(done_r, 1)
        if state == b"e":
            os.close(done_r)
            return
        if not state:  # died preparing: no request was taken
            os.close(done_r)
            os.waitpid(pid, 0)
            failures += 1
            if failures >= _MAX_PREPARE_FAILURES:
                raise SystemExit(f"{failures} supervisors in a row failed to prepare")
            continue
        failures = 0
        finished = os.read(done_r, 1)
        os.close(done_r)
        if not finished:  # S died holding a request: the pool must not wait forever
            _, status = os.waitpid(pid, 0)
            wire.write_frame(
                sock_fd,
                {"type": "error", "message": f"supervisor died ({_describe(status)})"},
            )


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Try every isolation layer in throw-away child processes; what works on this host.

    Each layer is ``True`` or the error that stopped it, so that a report says *why* a layer
    is missing (no user namespaces allowed, no cgroup write access, unknown architecture)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        found: dict[str, Any] = {}
        try:
            found.update(_enter_worker_namespaces(dict(cfg, cache_dir=None, cgroup_dirs={})))
            try:
                _sys.unshare(_sys.CLONE_NEWPID)
                found["pid_ns"] = True
            except OSError as exc:
                found["pid_ns"] = str(exc)
            inner = os.fork()
            if inner == 0:
                got: dict[str, Any] = {}
                try:
                    _sys.mount("tmpfs", "/tmp", "tmpfs", 0, "size=1m")
                    got["private_tmp"] = True
                except OSError as exc:
                    got["private_tmp"] = str(exc)
                if os.geteuid() == 0 and cfg.get("uid") is not None:
                    try:
                        os.setgroups([])
                        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
                        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
                        got["slot_uid"] = True
                    except OSError as exc:
                        got["slot_uid"] = str(exc)
                else:
                    got["slot_uid"] = "needs root (one uid per pool slot)"
                try:
                    _sys.unshare(_sys.CLONE_NEWUSER)
                    got["user_ns"] = True
                except OSError as exc:
                    got["user_ns"] = str(exc)
                try:
                    _sys.set_no_new_privs()
                    _sys.install_seccomp(seccomp.build_filter())
                    got["seccomp"] = True
                except (OSError, ValueError) as exc:
                    got["seccomp"] = str(exc)
                os.write(w, json.dumps(got).encode())
                os._exit(0)
            os.waitpid(inner, 0)
        except BaseException as exc:
            found["probe_error"] = repr(exc)
        os.write(w, b"\n" + json.dumps(found).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result: dict[str, Any] = {}
    for part in data.split(b"\n"):
        if part.strip():
            result.update(json.loads(part))
    return result


def main() -> None:
    """Entry point: ``python -c '...zygote import main; main()' FD CONFIG`` (``FD=probe`` to
    print :func:`probe`'s findings as JSON instead of serving)."""
    cfg = json.loads(sys.argv[2])
    if sys.argv[1] == "probe":
        print(json.dumps(probe(cfg)))
        return
    sock = socket.socket(fileno=int(sys.argv[1]))
    # Drop the path we were imported from: sandboxed code sees the stdlib only.
    cfg["sys_path"] = [p for p in sys.path if p and p not in cfg.get("drop_sys_path", [])]
    sys.path[:] = cfg["sys_path"]
    _preload()
    if cfg["apply"].get("seccomp"):
        _SECCOMP.append(_sys.SeccompProgram(seccomp.build_filter()))
    for path in cfg["cgroup_dirs"].values():  # once: every fork below inherits the cgroups
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    layers = _enter_worker_namespaces(cfg)
    cfg["cache_fd"] = os.open(cfg["cache_dir"], os.O_RDONLY | os.O_DIRECTORY)
    cfg["apply"]["mount_ns"] = layers.get("mount_ns") is True
    wire.write_frame(sock.fileno(), {"type": "ready", "pid": os.getpid(), "layers": layers})
    gc.freeze()  # keep the collector from touching (and so copying) inherited pages in forks
    with contextlib.suppress(wire.FrameError):
        serve(sock, cfg)
