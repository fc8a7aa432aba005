"""The zygote: one warm sandbox worker; it forks one program process per execution.

Process tree::

    pool ──socket── zygote   root; its own mount (read-only view of the system), net, ipc and
                      │      uts namespaces, joined once to the slot's cgroups; interpreter and
                      │      common stdlib modules warm
                      └ P    one per execution, forked as a spare *before* its job exists:
                             pid 1 of a new pid namespace, private tmpfs /tmp, /dev/shm and
                             /proc and its own IPC namespace, then the slot uid, no_new_privs,
                             its own user namespace and seccomp (see
                             :mod:`tangram_sandbox.program`)

Why one fork: forks dominate the cost (a Python fork and exit is about 2 ms of CPU on a VM),
so the zygote itself supervises: it hands P its job, watches P's pipes and its pidfd,
enforces the deadline, and SIGKILLs P on timeout. (A separate fork server, so that the
zygote would not copy the ~230 pages it writes per job after each fork, was measured twice.
With the exit status relayed through it: 15% fewer executions per second. With the exit
notifier, so that nothing is relayed: the supervisor took no faults at all, but P took more,
since the pages the zygote wrote were mostly pages P writes too, and the first writer of such
a page copies it; CPU per run 4.01 against 3.98 ms. See the README's "How it is fast".) P is
pid 1 of its namespace, so its death takes every process it started with it (daemons, fork
bombs).

Why so few pages written per run (the environment, the ``sys.std*`` objects and the mount
options are prepared here once; files are read and written without file objects): on a VM a
page fault costs microseconds, and every page the zygote or P writes after a fork is one.

What a request waits for, and what it does not: a spare is forked and set up before its job
exists, so a request never waits for a fork or for isolation set-up. The answer goes out when
the kernel reports the program's ``exit_group``, before P tears its address space down (see
:meth:`_Zygote._watch`); that teardown (about half a millisecond for a fork of this
interpreter), the release of the program's mount namespace and the next spare's fork all
happen after the answer. (Forked while the program ran, the spare took a core from the
program and the pool on a 2-core machine. Walking the job's path once in the spare, to take
its copy-on-write faults before the job came, was measured too: lower p10, higher p50, since
on 2 cores a run of warm executions is bound by their total CPU, about 4 ms each.)

Why the zygote never holds an execution's data: each P is a fork of the zygote and can read
its own memory, so whatever passed through the zygote's heap would be visible to every later
execution. The job goes from the pool's socket into P's pipe with ``splice(2)``, P's output
goes to the socket the same way, fetched files with ``sendfile(2)``; the zygote reads only the
control frames (limits, sizes, exit codes). Expected test outputs never enter the sandbox:
the pool compares.

Stdlib-only: this runs under the system interpreter, whose stdlib an unprivileged uid can read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import math
import os
import resource
import select
import signal
import stat
import struct
import sys
import termios
import time
from typing import Any

from tangram_sandbox import _sys, seccomp, wire
from tangram_sandbox import batch as _batch  # noqa: F401 - loaded here: a program's /tmp may hide our source
from tangram_sandbox.program import PROGRAM_ENV, WORKDIR, premake_stdio, spare_main

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
_LEN = struct.Struct(">I")
#: How the zygote opens a program's files: never through a link, never blocking on a FIFO.
_READ_BENEATH = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_BENEATH = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _own_pid_namespace() -> None:
    """Rootless: carry on as pid 1 of a pid namespace that our user namespace owns.

    Why: every program gets a fresh pid namespace, and between two the zygote must go back to
    its own (``unshare(CLONE_NEWPID)`` works only from the active one). ``setns`` into the
    host's pid namespace needs CAP_SYS_ADMIN over the host's user namespace, which a rootless
    zygote lacks, so the second execution of every worker failed. So we fork: the child is
    the zygote from here on, with a ``/proc`` of its namespace (pids from ``fork`` and pids in
    ``/proc`` must agree); the parent, the process the pool started and watches, holds
    nothing, waits and exits with it. The child dies with the parent (parent-death signal),
    and as its namespace's pid 1 takes every program with it."""
    _sys.unshare(_sys.CLONE_NEWPID)
    child = os.fork()
    if child:
        os.closerange(3, 1 << 16)  # the socket is the child's alone: its exit is end-of-stream
        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        os._exit(code if code >= 0 else 128 - code)
    _sys.set_pdeathsig(signal.SIGKILL)
    _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)


def _prepare_for_programs(cfg: dict[str, Any]) -> None:
    """What every program's set-up would otherwise work out or set again, done once here.

    Why: every page a program process writes is a page it copies from the zygote (a fault of
    a few microseconds on a VM), so per-run set-up is kept to the system calls themselves. The
    environment is the programs' own (the pool starts us with exactly that; enforced here
    for a zygote started by other means), the core-dump limit is already 0, and which
    mount points exist is known from our own (read-only) view. A program's ``sys.std*``
    objects are made here too (see :func:`tangram_sandbox.program.premake_stdio`)."""
    if os.environ != PROGRAM_ENV:
        os.environ.clear()
        os.environ.update(PROGRAM_ENV)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cfg["tmp_mount_data"] = f"size={int(cfg['tmp_size_mb'])}m,mode=1777".encode()
    cfg["has_dev_shm"] = os.path.isdir("/dev/shm")
    cfg["has_dev_mqueue"] = os.path.isdir("/dev/mqueue")
    premake_stdio()


def _preload() -> None:
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):  # a trimmed stdlib
            __import__(name)


def _open_oom_counter(cfg: dict[str, Any]) -> int | None:
    """An fd on the memory controller's OOM counts (v1 ``memory.oom_control``, v2
    ``memory.events``), opened once and re-read with ``pread`` at offset 0 after every job.

    Why held open: opening, reading and parsing the file afresh each job cost the zygote ~16
    copied pages a run. ``None`` where the slot has no memory controller."""
    dirs = cfg["cgroup_dirs"]
    if "memory" in dirs:
        path = os.path.join(dirs["memory"], "memory.oom_control")
    elif "unified" in dirs:
        path = os.path.join(dirs["unified"], "memory.events")
    else:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _oom_kills(fd: int | None) -> int:
    """The slot's ``oom_kill`` count so far: an increase during a job means the kernel killed
    one of its processes for memory. (In v1 the line follows ``oom_kill_disable``, in v2
    ``oom``: either way, the one that starts a line with ``oom_kill ``.)"""
    if fd is None:
        return 0
    try:
        text = b"\n" + os.pread(fd, 4096, 0)
    except OSError:
        return 0
    at = text.find(b"\noom_kill ")
    if at < 0:
        return 0
    end = text.find(b"\n", at + 1)
    return int(text[at + 10 : end if end > 0 else len(text)])


def _set_cgroup_limits(cfg: dict[str, Any], limits: dict[str, Any]) -> None:
    dirs = cfg["cgroup_dirs"]
    # The slot's cgroup also holds the zygote and S: headroom for them over the program's own.
    mem = (int(limits["memory_mb"]) + 64) << 20
    procs = int(limits["processes"]) + 2
    if cfg.get("cgroup_set") == (mem, procs):
        return  # writing a v1 memory limit is not free; most jobs repeat the last one
    cfg["cgroup_set"] = (mem, procs)
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


# --- moving bytes without holding them ------------------------------------------------------------


class _Unmoved(BrokenPipeError):
    """``dst`` lost its reader with ``left`` bytes still to move (still in ``src``)."""

    def __init__(self, left: int) -> None:
        super().__init__(f"reader gone with {left} bytes still to move")
        self.left = left


def _splice_exact(src: int, dst: int, n: int) -> None:
    """Move exactly ``n`` bytes from ``src`` to ``dst`` in the kernel (one end is a pipe)."""
    while n > 0:
        try:
            moved = os.splice(src, dst, min(n, 1 << 20))
        except BrokenPipeError:
            raise _Unmoved(n) from None
        if moved == 0:
            raise wire.FrameError(f"stream ended with {n} bytes still to move")
        n -= moved


def _discard(sock_fd: int, n: int) -> None:
    """Drop ``n`` bytes of the socket through a scratch pipe into /dev/null."""
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        while n > 0:
            moved = os.splice(sock_fd, w, min(n, 1 << 16))
            if moved == 0:
                raise wire.FrameError("socket closed inside a payload")
            _splice_exact(r, null, moved)
            n -= moved
    finally:
        for fd in (r, w, null):
            os.close(fd)


def _available(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


# --- the zygote -----------------------------------------------------------------------------------


class _Files:
    """A program's working directory, held by descriptor from before its code runs.

    Why a descriptor taken early: the zygote reads and writes a program's files as root, and
    every name under ``/tmp`` is the program's to rename or replace with a symlink (to
    ``/etc``, say). Opened through ``/proc/PID/root`` while P has run only our set-up code, the
    descriptor names the tmpfs directory P made, whatever the program later does to the path;
    every file is then opened beneath it one component at a time with ``O_NOFOLLOW``, so no
    name the program controls is ever resolved with the zygote's privileges. A program cannot
    mount (seccomp, and no capability over its mount namespace), so nothing beneath the
    descriptor leaves its tmpfs. The mount namespace is held too, so that tearing it down
    happens when we let go, off the critical path."""

    __slots__ = ("mnt", "work")

    def __init__(self, pid: int) -> None:
        self.mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.work = os.open(f"/proc/{pid}/root{WORKDIR}", flags)
        except OSError:
            os.close(self.mnt)
            raise

    def close(self) -> None:
        for fd in (self.work, self.mnt):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Spare:
    """A program process waiting for its job, and the zygote's ends of its pipes.

    (Slots, not a ``__dict__``: one object made per execution, after the fork, is a page
    or two the zygote copies; a dict growing to these attributes was a few more.)"""

    __slots__ = (
        "err",
        "failure",
        "files",
        "go",
        "out",
        "pid",
        "proc",
        "said",
        "side",
        "status",
    )

    def __init__(self, z: _Zygote) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        side_r, side_w = os.pipe()
        go_r, go_w = os.pipe()
        status_r, status_w = os.pipe()
        if z.cfg["apply"]["pid_ns"]:
            if z.pid_ns_used:  # back to our own pid namespace, to unshare a fresh one
                _sys.setns(z.own_pid_ns, _sys.CLONE_NEWPID)
            _sys.unshare(_sys.CLONE_NEWPID)
            z.pid_ns_used = True
        fds = {
            "stdin": z.devnull,
            "stdout": out_w,
            "stderr": err_w,
            "result": side_w,
            "go": go_r,
            "status": status_w,
        }
        self.pid = os.fork()
        if self.pid == 0:
            if z.listener is not None:
                # Only the zygote may hold it: a process that holds the listener it would be
                # stopped at waits for itself (a spare failing to start would hang forever).
                os.close(z.listener)
            spare_main(z.cfg, fds)
        for fd in (out_w, err_w, side_w, go_r, status_w):
            os.close(fd)
        self.out, self.err, self.side, self.go = out_r, err_r, side_r, go_w
        self.status = status_r  # P's trusted channel (see program.STATUS_FD)
        self.said = b""  # what P has said there after "r"
        self.failure: str | None = None
        self.files: _Files | None = None
        self.proc: tuple[int, int] | None = None  # P's /proc stat and status, held open

    def wait_ready(self) -> bool:
        """Block until P has its mounts; then take hold of its working directory (see
        :class:`_Files`) while only our code has run there, and of the ``/proc`` files its
        usage is read from at its end (opened now, off the request's critical path)."""
        if self.failure is not None:
            return False
        if self.files is None:
            first = os.read(self.status, 1)
            if first != b"r":
                rest = os.read(self.status, 4096) if first else b""
                self.failure = rest.decode(errors="replace") or "it died while starting"
                return False
            opened: list[int] = []
            try:
                files = _Files(self.pid)
                opened += (files.mnt, files.work)
                for name in ("stat", "status"):
                    opened.append(os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:  # it died since (killed from outside, say)
                for fd in opened:
                    os.close(fd)
                self.failure = f"it died while starting: {exc}"
                return False
            self.files, self.proc = files, (opened[2], opened[3])
        return True

    def read_status(self) -> None:
        """Take what P has said on its status pipe since "r", without blocking: ``g`` and
        the program's start (CLOCK_MONOTONIC, ns), or ``E`` and why set-up failed.

        Why read only when it matters (at P's end, or at the deadline) and not watched: each
        message would wake the zygote while the program runs, twice a run (the byte, then
        the close). P writes each message in one write of under ``PIPE_BUF`` bytes, so what
        is there is whole."""
        n = _available(self.status)
        if n:
            self.said += os.read(self.status, n)

    @property
    def started(self) -> float | None:
        """When the program started (``time.monotonic()`` seconds), or ``None``: not yet."""
        if self.said.startswith(b"g"):
            return int(self.said[1:].split(b"\n", 1)[0]) / 1e9
        return None

    def close_pipes(self) -> None:
        for fd in (self.out, self.err, self.side, self.go, self.status, *(self.proc or ())):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Zygote:
    def __init__(self, sock_fd: int, cfg: dict[str, Any], listener: int | None) -> None:
        self.fd = sock_fd
        self.cfg = cfg
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.null_w = os.open(os.devnull, os.O_WRONLY)
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        self.pid_ns_used = False
        self.cache = cfg["cache_fd"]
        self.spare: _Spare | None = None
        self.last_files: _Files | None = None  # the finished program's, until the fetch
        self.binary: str | None = None  # the request's compiled program (cache key)
        self.compile_failed = False
        self.oom_fd = _open_oom_counter(cfg)
        self.ooms = _oom_kills(self.oom_fd)  # the slot's OOM kills so far
        self.held = b""  # a job's end frame, held to go out with the fetch that follows
        # the exit notifier's listener (see _watch), and the (notification id, pid) of the P
        # it holds in exit_group until the request is answered
        self.listener = listener
        self.exiting: tuple[int, int] | None = None

    # -- frames -------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        wire.write_all(self.fd, self.held + wire.encode_json(obj))
        self.held = b""

    def flush(self) -> None:
        if self.held:
            wire.write_all(self.fd, self.held)
            self.held = b""

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            if not self.held:
                # Once this request is answered, off its critical path: the last P finishes
                # dying, and the next spare forks (forked while the program ran, it took a
                # core from the program and from the pool on a 2-core machine).
                self._release_exited()
                if self.spare is None:
                    self.spare = _Spare(self)
                # And its mounts, before the next request comes (a failure to start is
                # reported to that request).
                self.spare.wait_ready()
            head = wire.read_typed_header(self.fd)
            if head is None:
                return
            kind, size = head
            if kind != wire.JSON:
                raise wire.FrameError(f"expected a control frame, got {kind!r}")
            msg = wire.read_json_body(self.fd, size)
            if msg["op"] != "fetch":
                self.flush()
                self._release_exited()
            if msg["op"] == "job":
                self._job(msg)
                if msg.get("last"):
                    self._end_request()
            elif msg["op"] == "fetch":
                self._fetch(msg.get("names") or [], int(msg.get("limit", 1 << 20)))
            else:
                raise wire.FrameError(f"unknown op {msg['op']!r}")

    # -- one job ------------------------------------------------------------------------------

    def _job(self, meta: dict[str, Any]) -> None:
        head = wire.read_typed_header(self.fd)
        if head is None or head[0] != wire.PAYLOAD:
            raise wire.FrameError("a job's control frame must be followed by its payload")
        size = head[1]
        compile_key = meta.get("compile")
        if compile_key is not None:
            self.binary, self.compile_failed = compile_key, False
            with contextlib.suppress(FileNotFoundError):
                os.stat(compile_key, dir_fd=self.cache)
                _discard(self.fd, size)
                self.send({"type": "end", "compiled": True, "cached": True})
                return
        elif self.compile_failed and meta.get("binary"):
            # only the runs of a program whose compile step failed: whatever else comes (a new
            # request after a failed one that ended without its fetch) runs as usual
            _discard(self.fd, size)
            self.send({"type": "end", "skipped": "compilation failed"})
            return
        spare, self.spare = self.spare or _Spare(self), None
        if not spare.wait_ready():
            _discard(self.fd, size)
            spare.close_pipes()
            with contextlib.suppress(ChildProcessError):  # it has exited (or is exiting)
                os.waitpid(spare.pid, 0)
            why = spare.failure
            self.send({"type": "end", "sandbox_error": f"program process failed to start: {why}"})
            return
        limits = meta["limits"]
        if meta.get("binary") and self.binary:
            self._copy_binary_in(spare)
        _set_cgroup_limits(self.cfg, limits)
        start = time.monotonic()
        try:
            wire.write_all(spare.go, _LEN.pack(size))
            _splice_exact(self.fd, spare.go, size)
        except BrokenPipeError as exc:  # P died setting up: drop the rest of the job
            _discard(self.fd, exc.left if isinstance(exc, _Unmoved) else size)
        os.close(spare.go)
        end = self._watch(spare, limits, start)
        if self.last_files is not None:
            self.last_files.close()
        self.last_files, spare.files = spare.files, None
        if compile_key is not None:
            ok = end["exit_code"] == 0 and not end["timed_out"]
            self.compile_failed = not ok
            if ok:
                self._copy_binary_out(compile_key)
            end["compiled"] = ok
        if not meta.get("last") and _available(self.fd):
            # The request's next op is already here (the pool sends a job and its fetch in
            # one write): answer both in one write, so that the pool wakes once, not twice.
            self.held = wire.encode_json(end)
        else:
            self.send(end)

    def _watch(self, spare: _Spare, limits: dict[str, Any], start: float) -> dict[str, Any]:
        """Stream P's output to the pool within its caps until P and its pipes are done.

        ``poll(2)`` on a handful of descriptors, not ``selectors``: one syscall per wait and
        no selector object per job (each object the zygote makes after a fork is a page it
        copies).

        P's end is seen one of two ways. Every process forked from here inherits the exit
        notifier (see :func:`tangram_sandbox.seccomp.build_exit_notifier`): when P calls
        ``exit_group``, the kernel stops it there and tells us, before P has torn anything
        down. Everything P wrote is in its pipes by then, so we take that, answer, and let P
        go on dying after the answer (:meth:`_release_exited`). The exits of P's children and
        threads are let through at once. Where there is no notifier, or when P dies by a
        signal, its pidfd says so once it is gone."""
        cap = int(limits["output_bytes"])
        room = {wire.STDOUT: cap, wire.STDERR: cap, wire.SIDE: wire.MAX_FRAME // 4}
        truncated = {wire.STDOUT: False, wire.STDERR: False, wire.SIDE: False}
        kinds = {spare.out: wire.STDOUT, spare.err: wire.STDERR, spare.side: wire.SIDE}
        proc = spare.proc
        assert proc is not None  # every spare watched has passed wait_ready
        pidfd = os.pidfd_open(spare.pid)
        watched = {*kinds, pidfd}
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # The wall limit is the program's: its clock starts when P says the program starts
        # (see _Spare.read_status). Until then P runs our set-up (well under a millisecond),
        # bounded on its own: a set-up that hangs is the sandbox's failure, never the
        # program's timeout. The first deadline is the earliest the program's can be.
        wall = float(limits["wall_s"])
        deadline = start + wall
        timed_out = False
        status: int | None = None  # P's wait status, once reaped
        exit_code: int | None = None  # P's exit_group status, from the listener
        listener = self.listener
        if listener is not None:
            watched.add(listener)
            poller.register(listener, select.POLLIN)
        # P's streams are not watched for the first _QUIET_S of the job: most programs are
        # done by then, and their output is taken at their exit, with the end, in one write
        # (watched from the start, each program's first write woke the zygote, and the pool
        # for a frame of its own). A program that fills a pipe (64 KiB) sooner waits out the
        # rest of the window once. Without the exit notifier, P's end comes from its pidfd
        # once it is gone, and its streams are watched from the start.
        quiet_until = start + _QUIET_S if listener is not None else start
        streams_polled = False
        cpu = 0.0
        rss_kb = 0
        end = start

        def poll_streams() -> None:
            nonlocal streams_polled
            streams_polled = True
            for fd in kinds:
                if fd in watched:
                    poller.register(fd, select.POLLIN)

        def done_with(fd: int) -> None:
            if streams_polled or fd not in kinds:
                poller.unregister(fd)
            watched.discard(fd)
            os.close(fd)

        def forward(fd: int) -> bool:
            """Move what P's stream ``fd`` holds to the pool, within its cap; False at its end
            (or the side channel over its cap)."""
            kind = kinds[fd]
            n = _available(fd)
            take = min(n, room[kind])
            if take:
                wire.write_all(self.fd, wire.TYPED_HEADER.pack(kind, take))
                _splice_exact(fd, self.fd, take)
                room[kind] -= take
            if n and take == n:
                return True
            if n and kind != wire.SIDE:
                # Over the cap: keep the first bytes, drop the rest, and let the program
                # run on (as SandboxFusion does): a broken pipe would fail a program whose
                # only fault is talking too much.
                truncated[kind] = True
                _splice_exact(fd, self.null_w, n - take)
                return True
            truncated[kind] = truncated[kind] or bool(n)
            return False

        while watched:
            waiting = status is None and exit_code is None and not timed_out
            now = time.monotonic()
            if not streams_polled and (not waiting or now >= quiet_until):
                poll_streams()
            until = deadline if streams_polled else min(deadline, quiet_until)
            wait_ms = math.ceil(max(0.0, until - now) * 1000) if waiting else None
            events = poller.poll(wait_ms)
            if not events and waiting:
                now = time.monotonic()
                if now < deadline:
                    continue
                spare.read_status()
                go = spare.started
                if go is not None:
                    deadline = go + wall
                elif now < start + _SETUP_S + wall and not spare.said:
                    deadline = min(now + _SETUP_POLL_S, start + _SETUP_S + wall)
                if now >= deadline:
                    timed_out, end = True, now
                    _kill(spare.pid)
                continue
            for fd, _ in events:
                if fd not in watched:
                    continue  # let go of earlier in this round
                if fd == pidfd:
                    _, status, usage = os.wait4(spare.pid, 0)
                    end = end if timed_out else time.monotonic()
                    cpu, rss_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
                    done_with(pidfd)
                    if listener is not None:  # ours, held for the next job
                        poller.unregister(listener)
                        watched.discard(listener)
                    _kill(spare.pid)
                    continue
                if fd == listener:
                    try:
                        notice = _sys.notice_recv(fd)
                    except OSError:
                        continue  # its caller died first: P's pidfd tells
                    if notice.pid == spare.pid:
                        spare.read_status()
                    if notice.pid != spare.pid or spare.started is None or timed_out:
                        _sys.notice_continue(fd, notice.id)  # a child's or a thread's exit
                        continue
                    exit_code, end = notice.arg0 & 0xFF, time.monotonic()
                    cpu, rss_kb = _usage_of(spare.pid, proc)
                    for stream in [f for f in kinds if f in watched]:
                        forward(stream)  # all that P wrote; what its children add is lost
                        done_with(stream)
                    if pidfd in watched:
                        done_with(pidfd)
                    poller.unregister(fd)
                    watched.discard(fd)
                    self.exiting = (notice.id, spare.pid)
                    break
                if not forward(fd):
                    done_with(fd)
        if exit_code is None:
            exit_code = os.waitstatus_to_exitcode(status) if status is not None else None
        spare.read_status()  # P is gone or in its exit_group: nothing more will come
        for fd in (spare.status, *proc):
            os.close(fd)
        go = spare.started
        # One read of the memory controller's OOM count per job, against the last one: only
        # this slot's processes are in its cgroup, and only a job runs code there.
        ooms = _oom_kills(self.oom_fd)
        oom_killed, self.ooms = ooms > self.ooms, ooms
        extra: dict[str, Any] = {}
        if go is None:
            said = spare.said[1:] if spare.said.startswith(b"E") else b""
            why = said.decode(errors="replace") or f"it died before the program started ({status=})"
            extra["sandbox_error"] = f"program set-up failed: {why}"
        elif (
            status is not None
            and not timed_out
            and self.cfg["apply"]["pid_ns"]
            and os.WIFSIGNALED(status)
            and os.WTERMSIG(status) == signal.SIGKILL
        ):
            # P is pid 1 of its namespace, and the kernel drops a SIGKILL sent to a namespace's
            # init from inside it: neither the program nor its children can have sent this
            # one. It came from the kernel (an OOM kill, or RLIMIT_CPU's hard limit, which the
            # pool tells apart by the cgroup's count and the CPU time) or from outside the
            # sandbox (an operator, another supervisor): the pool reports the latter as the
            # infrastructure's failure, never as the program crashing.
            extra["killed_outside"] = True
        return {
            **extra,
            "type": "end",
            "exit_code": exit_code,
            "timed_out": timed_out,
            "oom_killed": oom_killed,
            "stdout_truncated": truncated[wire.STDOUT],
            "stderr_truncated": truncated[wire.STDERR],
            "wall_s": end - (start if go is None else go),
            "cpu_s": cpu,
            "max_rss_mb": rss_kb / 1024.0,
        }

    def _release_exited(self) -> None:
        """Let the last P finish its ``exit_group`` (held since :meth:`_watch` saw it), and
        wait until it is gone: its memory and pids leave the slot's cgroup, and its IPC
        namespace goes, before another program of this worker starts."""
        if self.exiting is None or self.listener is None:
            return
        notice_id, pid = self.exiting
        self.exiting = None
        _sys.notice_continue(self.listener, notice_id)
        # And SIGKILL: a signal that reaches P while it waits (a Go runtime's preemption
        # signal, say) restarts its exit_group as a new notification, which nobody reads
        # now. Its result is sent; all that is left of it is dying.
        _kill(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    # -- compiled programs --------------------------------------------------------------------

    def _copy_binary_out(self, key: str) -> None:
        """The compiler's output, from the finished program's tmpfs into the (root-only) cache."""
        assert self.last_files is not None
        src = os.open("main", _READ_BENEATH, dir_fd=self.last_files.work)
        try:
            size = os.fstat(src).st_size
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise OSError(errno.EINVAL, "compiler output is not a regular file")
            tmp = f"{key}.{os.getpid()}.tmp"
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700, dir_fd=self.cache)
            try:
                _sendfile_all(dst, src, size)
            finally:
                os.close(dst)
            os.replace(tmp, key, src_dir_fd=self.cache, dst_dir_fd=self.cache)
        finally:
            os.close(src)

    def _copy_binary_in(self, spare: _Spare) -> None:
        assert spare.files is not None
        assert self.binary is not None
        src = os.open(self.binary, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.cache)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dst = os.open("main", flags, 0o755, dir_fd=spare.files.work)
            try:
                _sendfile_all(dst, src, os.fstat(src).st_size)
                if self.cfg["apply"]["slot_uid"]:
                    os.fchown(dst, self.cfg["uid"], self.cfg["gid"])
                os.fchmod(dst, 0o755)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    # -- files out ----------------------------------------------------------------------------

    def _fetch(self, names: list[str], limit: int) -> None:
        """Send the named files of the last program (never following links), then let its
        filesystem go: this is also how a request ends."""
        if self.last_files is not None:
            for name in names:
                fd, error = _open_beneath(self.last_files.work, name)
                if fd is None:
                    self.send({"type": "file", "name": name, "error": error})
                    continue
                try:
                    size = os.fstat(fd).st_size
                    take = min(size, limit)
                    self.send({"type": "file", "name": name, "truncated": size > limit})
                    wire.write_all(self.fd, wire.TYPED_HEADER.pack(wire.FILE, take))
                    sent = _sendfile_all(self.fd, fd, take)
                    if sent < take:  # it shrank under us: keep the frame whole
                        wire.write_all(self.fd, bytes(take - sent))
                finally:
                    os.close(fd)
        else:
            for name in names:
                self.send({"type": "file", "name": name, "error": "no program ran"})
        self.send({"type": "fetched"})
        self._end_request()

    def _end_request(self) -> None:
        """After a request's last answer (its fetch's, or its ``last`` job's): forget its
        compiled program, and let its filesystem go. Off the critical path: the last reference
        to the program's mount namespace goes here, and its teardown waits for an (expedited)
        RCU grace period."""
        self.binary, self.compile_failed = None, False
        if self.last_files is not None:
            self.last_files.close()
            self.last_files = None


def _open_beneath(work: int, name: str) -> tuple[int | None, str | None]:
    """Open ``name`` beneath the held working directory ``work`` (see :class:`_Files`) for
    reading: one component at a time, refusing links at every step and non-regular files.

    The pool validates names before they get here; the checks are repeated because this is
    the privileged side, which trusts no name."""
    parts = name.split("/")
    if not name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        return None, "must be a relative path inside the working dir"
    dir_fd = work
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_BENEATH, dir_fd=dir_fd)
            if dir_fd != work:
                os.close(dir_fd)
            dir_fd = nxt
        fd = os.open(parts[-1], _READ_BENEATH, dir_fd=dir_fd)
    except OSError as exc:
        return None, exc.strerror or str(exc)
    finally:
        if dir_fd != work:
            os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None, "not a regular file"
    return fd, None


def _sendfile_all(out_fd: int, in_fd: int, n: int) -> int:
    """Copy up to ``n`` bytes in the kernel; how many were copied (fewer at end of file)."""
    offset = 0
    while offset < n:
        sent = os.sendfile(out_fd, in_fd, offset, n - offset)
        if sent == 0:
            break
        offset += sent
    return offset


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _usage_of(pid: int, proc: tuple[int, int]) -> tuple[float, int]:
    """CPU seconds (its own, and its reaped children's) and peak RSS in KiB of a process that
    is still alive, as ``wait4`` would report them once it is gone; ``proc``: its ``/proc``
    stat and status files, opened beforehand."""
    cpu = 0.0
    with contextlib.suppress(OSError):
        cpu = time.clock_gettime(((~pid) << 3) | 2)  # the process's CPUCLOCK_SCHED clock
    rss_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        # after the name, which the program may set to anything (so: the last ')')
        fields = os.pread(proc[0], 4096, 0).rsplit(b")", 1)[1].split(None, 15)
        cpu += (int(fields[13]) + int(fields[14])) / _CLK_TCK  # cutime, cstime
        status = os.pread(proc[1], 16384, 0)
        start = status.find(b"\nVmHWM:")
        if start >= 0:
            rss_kb = int(status[start + 7 : status.index(b"\n", start + 1)].split()[0])
    return cpu, rss_kb


#: The most P's own set-up (inputs, limits) may take before the program starts.
_SETUP_S = 10.0
#: How often a deadline that came before the program started is looked at again.
_SETUP_POLL_S = 0.01
#: How long into a job its program's streams are left unwatched (see _Zygote._watch).
_QUIET_S = 0.005


def _kill(pid: int) -> None:
    """SIGKILL the program: as pid 1 of its namespace its death kills every descendant; the
    process-group kill covers a host without pid namespaces (best effort)."""
    for kill in (os.kill, os.killpg):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


# --- entry points ---------------------------------------------------------------------------------


def probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Try every isolation layer in throw-away child processes; what works on this host.

    Each layer is ``True`` or the error that stopped it, so that a report says *why* a layer
    is missing (no user namespaces allowed, no cgroup write access, unknown architecture)."""
    host_root = os.geteuid() == 0  # asked now: inside a rootless user namespace we are uid 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        found: dict[str, Any] = {}
        try:
            found.update(_enter_worker_namespaces(dict(cfg, cache_dir=None, cgroup_dirs={})))
            try:
                if found.get("worker_user_ns") is True:
                    _own_pid_namespace()  # as the zygote does
                own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
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
                if host_root and cfg.get("uid") is not None:
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
            if found["pid_ns"] is True:  # and a fresh one for the next execution, as _Spare does
                try:
                    _sys.setns(own_pid_ns, _sys.CLONE_NEWPID)
                    _sys.unshare(_sys.CLONE_NEWPID)
                except OSError as exc:
                    found["pid_ns"] = f"one pid namespace, but not a second: {exc}"
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
    # Die with the pool, and so take every program with us (their parent-death signal): else
    # a program the pool left running when it was killed ran on to its deadline.
    _sys.set_pdeathsig(signal.SIGKILL)
    # The pool's end of a stream socket, used as a plain fd (read/write/splice): no socket
    # module here, whose pages every fork would copy.
    sock_fd = int(sys.argv[1])
    # Drop the path we were imported from: sandboxed code sees the stdlib only.
    cfg["sys_path"] = [p for p in sys.path if p and p not in cfg.get("drop_sys_path", [])]
    sys.path[:] = cfg["sys_path"]
    _preload()
    if cfg["apply"].get("seccomp"):
        cfg["seccomp"] = _sys.SeccompProgram(seccomp.build_filter())
    for path in cfg["cgroup_dirs"].values():  # once: every fork below inherits the cgroups
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    layers = _enter_worker_namespaces(cfg)
    if layers.get("worker_user_ns") is True and cfg["apply"]["pid_ns"]:
        _own_pid_namespace()
    cfg["cache_fd"] = os.open(cfg["cache_dir"], os.O_RDONLY | os.O_DIRECTORY)
    cfg["apply"]["mount_ns"] = layers.get("mount_ns") is True
    _prepare_for_programs(cfg)
    listener = _exit_listener()
    try:
        zygote = _Zygote(sock_fd, cfg, listener)
        with contextlib.suppress(wire.FrameError, BrokenPipeError, ConnectionResetError):
            zygote.send({"type": "ready", "pid": os.getpid(), "layers": layers})
            gc.freeze()  # keep the collector from touching (and so copying) inherited pages
            zygote.serve()
    finally:
        if listener is not None:
            # On every way out (a pool gone before "ready" included): our own exit_group
            # would wait on this listener for an answer from ourselves. Closed, the kernel
            # lets every held exit through.
            os.close(listener)


def _exit_listener() -> int | None:
    """Install the exit notifier on the zygote itself, once: every spare and program forked
    from here inherits it, at no cost per execution (installing a filter compiles it, ~0.1
    ms a time on a VM). ``None`` where the kernel or the architecture cannot (the pidfd
    then tells every end)."""
    if not seccomp.supported():
        return None
    try:
        return _sys.install_listener(_sys.SeccompProgram(seccomp.build_exit_notifier()))
    except OSError:
        return None
