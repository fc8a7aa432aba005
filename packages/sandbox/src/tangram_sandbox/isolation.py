"""Which isolation layers this host allows, detected by trying them, and reported.

Why probe rather than read ``/proc/sys`` knobs: whether unprivileged user namespaces, mount
propagation changes or cgroup writes work depends on the kernel, its config, LSMs and the
container we may be in. Trying each layer in a throw-away child process (the same code path
the zygote uses) is the only answer that cannot drift from what the pool will really do.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

from pydantic import BaseModel

__all__ = [
    "LAYERS",
    "ZYGOTE_ENV",
    "Capabilities",
    "Layer",
    "capabilities",
    "cgroup_root",
    "package_root",
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
        return "\n".join(rows)


def package_root() -> str:
    """The directory holding ``tangram_sandbox`` (put on the zygote's path, then dropped)."""
    return str(Path(__file__).resolve().parent.parent)


#: The zygote's whole environment. Why explicit: every Python program is a fork of the zygote
#: and can read its memory, environment block included, so a zygote that inherited the
#: server's environment would hand ``TANGRAM_API_TOKEN`` (and every other secret of the
#: server) to each program. Programs get their own fixed environment on top of this.
ZYGOTE_ENV: dict[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}


def zygote_command(python: str, mode: str, cfg: dict[str, object]) -> list[str]:
    """argv that starts the zygote module (``mode``: a socket fd number, or ``probe``)."""
    src = package_root()
    boot = (
        "import sys; sys.path.insert(0, sys.argv[3]); "
        "from tangram_sandbox.zygote import main; main()"
    )
    return [python, "-I", "-c", boot, mode, json.dumps(cfg), src]


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
