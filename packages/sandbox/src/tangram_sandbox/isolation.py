"""Which isolation layers this host allows, detected by trying them, and reported.

Why probe rather than read ``/proc/sys`` knobs: whether unprivileged user namespaces, mount
propagation changes or cgroup writes work depends on the kernel, its config, LSMs and the
container we may be in. Trying each layer in a throw-away child process (the same code path
the zygote uses) is the only answer that cannot drift from what the pool will really do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from tangram_sandbox import program

if TYPE_CHECKING:
    from tangram_sandbox.config import PoolConfig

__all__ = [
    "LAYERS",
    "ZYGOTE_ENV",
    "Capabilities",
    "Layer",
    "capabilities",
    "cgroup_root",
    "package_root",
    "rootless_hidden",
    "zygote_command",
]

#: Every layer, with what it protects against. The first four always apply.
LAYERS: dict[str, str] = {
    "process": "one process tree per execution, killed as a whole on timeout",
    "rlimits": "address space, CPU time, file size, open files, processes",
    "wall_timeout": "wall-clock deadline per execution",
    "fresh_workdir": "a new empty working directory per execution",
    "user_ns": "the program runs in its own user namespace, with no capabilities outside it",
    "pid_ns": "the program sees only its own processes; its pid 1 takes every process down",
    "net_ns": "no network interfaces at all",
    "mount_ns": "private mounts",
    "ipc_ns": "no SysV IPC / POSIX mqueue shared with the host",
    "uts_ns": "own hostname",
    "seccomp": "deny-list: sockets but AF_UNIX, ptrace, mount, namespaces, bpf, keyctl, perf",
    "slot_uid": "each pool slot runs under its own unprivileged uid",
    "readonly_root": "the system is mounted read-only",
    "private_tmp": "a private tmpfs /tmp and /dev/shm per execution",
    "cgroup_memory": "memory limit and OOM detection by the kernel's memory controller",
    "cgroup_pids": "process-count limit by the pids controller",
}
_ALWAYS = ("process", "rlimits", "wall_timeout", "fresh_workdir")


class Layer(BaseModel):
    name: str
    available: bool
    detail: str


class Capabilities(BaseModel):
    """What :func:`capabilities` found. ``missing()`` lists layers a strict pool refuses
    to run without."""

    python: str
    euid: int
    layers: list[Layer]

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def available(self, name: str) -> bool:
        return self.layer(name).available

    def missing(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.available]

    def table(self) -> str:
        width = max(len(name) for name in LAYERS)
        rows = [f"sandbox isolation (python {self.python}, euid {self.euid})"]
        for layer in self.layers:
            mark = "yes" if layer.available else "NO "
            rows.append(f"  {layer.name:<{width}}  {mark}  {layer.detail}")
        return "\n".join(rows + self.rootless_notes())

    def rootless_notes(self) -> list[str]:
        """What running without root means here, from the layers found; empty as root.

        Why spelled out: "slot_uid NO" says what is missing, not what still keeps one
        execution from the next, nor what the user must do about the rest (README,
        "Rootless", has the measured table)."""
        if self.euid == 0:
            return []
        uid = self.euid
        held = [la.name for la in self.layers if la.available and la.name not in _ALWAYS]
        notes = [f"rootless (euid {uid}); these layers hold: {', '.join(held) or 'none'}"]
        if not self.available("slot_uid"):
            apart = [
                what
                for name, what in (
                    ("pid_ns", "its own pid namespace (it can neither see nor signal the rest)"),
                    ("mount_ns", "a fresh /tmp, /dev/shm and working dir"),
                    ("ipc_ns", "its own IPC namespace"),
                    ("seccomp", "seccomp"),
                )
                if self.available(name)
            ]
            notes.append(
                f"slot_uid degrades: every program runs as uid {uid}, the pool's own. What keeps "
                "an execution from the next and from the pool: "
                f"{', '.join(apart) or 'nothing'}; not file permissions. A program may read "
                f"what uid {uid} may read, except the home directory, the runtime dir and the "
                "pool's cache and lock dirs, which it finds empty: keep secrets (the server's "
                f"token file too) in the home directory. It keeps uid {uid}'s groups: run as a "
                "user in none that grants anything (docker, say)."
            )
        if not self.available("cgroup_memory"):
            notes.append(
                "cgroup_memory degrades: memory is limited per process (RLIMIT_AS), not per "
                "execution: a program of N processes may use N times its memory limit."
            )
        if not self.available("cgroup_pids"):
            notes.append(
                "cgroup_pids degrades: processes are limited per execution by RLIMIT_NPROC, "
                "which Linux (5.14 and later) counts in each execution's own user namespace."
            )
        wrap = functools.partial(textwrap.wrap, width=96, subsequent_indent="    ")
        return [notes[0]] + [line for note in notes[1:] for line in wrap(note, initial_indent="  ")]


def package_root() -> str:
    """The directory holding ``tangram_sandbox`` (put on the zygote's path, then dropped)."""
    return str(Path(__file__).resolve().parent.parent)


#: The zygote's whole environment. Why explicit: every Python program is a fork of the zygote
#: and can read its memory, environment block included, so a zygote that inherited the
#: server's environment would hand ``TANGRAM_API_TOKEN`` (and every other secret of the
#: server) to each program. It is exactly the programs' own, so that a program inherits it
#: and its process sets nothing (setting ``os.environ`` there cost ~80 copied pages a run).
ZYGOTE_ENV: dict[str, str] = dict(program.PROGRAM_ENV)


def zygote_command(python: str, mode: str, cfg: dict[str, object]) -> list[str]:
    """argv that starts the zygote module (``mode``: a socket fd number, or ``probe``)."""
    src = package_root()
    boot = (
        "import sys; sys.path.insert(0, sys.argv[3]); "
        "from tangram_sandbox.zygote import main; main()"
    )
    return [python, "-I", "-c", boot, mode, json.dumps(cfg), src]


def rootless_hidden(config: PoolConfig) -> list[str]:
    """The directories a rootless pool's programs find empty (a read-only tmpfs over each).

    Why: without slot uids a program runs as the pool's own uid, and the read-only root stops
    its writes, not its reads: it could read the server's token file, the user's keys, and
    every program in the compile cache, and write there (the cache is the zygote's writable
    hole) to poison a later run. So the home directory, the runtime dir (the user's systemd
    and D-Bus sockets) and the pool's own state are hidden. A directory that holds what
    programs need (the interpreter's prefix, the compiler, bash) stays visible."""
    home = [os.path.expanduser("~")]
    with contextlib.suppress(KeyError):
        home.append(pwd.getpwuid(os.geteuid()).pw_dir)
    runtime = [os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.geteuid()}"]
    needed = [
        *("/bin", "/dev", "/etc", "/lib", "/lib64", "/proc", "/tmp", "/usr"),  # HOME=/tmp, say
        os.path.dirname(os.path.dirname(os.path.realpath(config.python))),
        os.path.dirname(os.path.realpath(config.cpp_compiler)),
        os.path.dirname(os.path.realpath(config.bash)),
    ]
    hidden: list[str] = []
    for path in [*home, *runtime, config.cache_dir, config.lock_dir]:
        path = os.path.realpath(path) if os.path.isabs(path) else ""
        if not path or path == "/" or path in hidden or not os.path.isdir(path):
            continue
        if not any(n == path or n.startswith(path + "/") for n in needed):
            hidden.append(path)
    return hidden


def cgroup_root() -> dict[str, str]:
    """Where this host's memory and pids controllers live (v2 unified, or v1 per controller)."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return {"unified": str(base)}
    found = {}
    for controller in ("memory", "pids"):
        if (base / controller / "cgroup.procs").exists():
            found[controller] = str(base / controller)
    return found


def _cgroup_writable(root: str) -> str | None:
    probe = Path(root) / f"tangram-sandbox-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return None
    except OSError as exc:
        return f"cannot create a cgroup under {root}: {exc.strerror}"


@functools.cache
def capabilities(python: str | None = None, uid: int = 200_000) -> Capabilities:
    """Probe this host once per process (cached); see the module docstring."""
    from tangram_sandbox.config import default_python

    python = python or default_python()
    cmd = zygote_command(python, "probe", {"uid": uid, "gid": uid})
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, check=False, env=ZYGOTE_ENV
    )
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found = {"probe_error": proc.stderr.strip()[-500:] or f"exit code {proc.returncode}"}
    layers = [Layer(name=n, available=True, detail=LAYERS[n]) for n in _ALWAYS]
    for name in ("user_ns", "pid_ns", "net_ns", "mount_ns", "ipc_ns", "uts_ns", "seccomp"):
        layers.append(_layer(name, found))
    layers.append(_layer("slot_uid", found))
    layers.append(_layer("readonly_root", found))
    layers.append(_layer("private_tmp", found))
    roots = cgroup_root()
    for name, controller in (("cgroup_memory", "memory"), ("cgroup_pids", "pids")):
        root = roots.get(controller) or roots.get("unified")
        if root is None:
            layers.append(Layer(name=name, available=False, detail=f"no {controller} cgroup"))
            continue
        problem = _cgroup_writable(root)
        detail = problem or f"{LAYERS[name]} ({'v2' if 'unified' in roots else 'v1'})"
        layers.append(Layer(name=name, available=problem is None, detail=detail))
    return Capabilities(python=python, euid=os.geteuid(), layers=layers)


def _layer(name: str, found: dict[str, object]) -> Layer:
    value = found.get(name, found.get("probe_error", "not probed"))
    if value is True:
        return Layer(name=name, available=True, detail=LAYERS[name])
    return Layer(name=name, available=False, detail=str(value))
