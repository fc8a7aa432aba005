"""How a sandbox pool is configured (static settings; its size is runtime state)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_sandbox.models import Limits

__all__ = ["PoolConfig", "default_python"]


def default_python() -> str:
    """The interpreter sandboxed Python runs in: the system one when it exists, because an
    unprivileged slot uid must be able to read its stdlib (a venv under ``/root`` is not)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "tangram-sandbox")


def _default_lock_dir() -> str:
    """Root's pools share one directory, because slot uids are leased host-wide. A rootless
    pool has no slot uids to share and gets a directory of its own: root's (mode 700) is
    closed to it, and a pool must never lock in a directory another user made."""
    if os.geteuid() == 0:
        return "/tmp/tangram-sandbox-slots"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else "/tmp"
    return os.path.join(base, f"tangram-sandbox-slots-{os.geteuid()}")


class PoolConfig(BaseModel):
    """Settings of a :class:`~tangram_sandbox.pool.SandboxPool`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("sandbox", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    min_workers: int = Field(1, ge=0, description="Warm workers kept even when idle.")
    max_workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="Most workers (slots)."
    )
    isolation: Literal["strict", "best_effort"] = Field(
        "best_effort",
        description="'strict' refuses to start when any isolation layer is missing; "
        "'best_effort' warns loudly and runs with the layers it has.",
    )
    python: str = Field(default_factory=default_python, description="Sandboxed interpreter.")
    uid_base: int = Field(
        200_000, ge=1000, description="First uid of the slot range (one uid per worker slot)."
    )
    uid_count: int = Field(4096, ge=1, description="Size of the slot uid range.")
    lock_dir: str = Field(
        default_factory=_default_lock_dir,
        description="Slot uid lock files; a directory of this uid's own, closed to others.",
    )
    cache_dir: str = Field(default_factory=_default_cache, description="C++ binaries, per hash.")
    tmp_size_mb: int = Field(256, ge=8, description="Private /tmp (tmpfs) of each execution.")
    cgroups: bool = Field(True, description="Use cgroups for memory and pids when writable.")
    default_limits: Limits = Field(default_factory=Limits)
    max_limits: Limits = Field(
        default_factory=lambda: Limits(wall_s=600, memory_mb=8192, processes=512),
        description="Request limits are clamped to these.",
    )
    compile_limits: Limits = Field(
        default_factory=lambda: Limits(wall_s=60, memory_mb=4096, processes=32)
    )
    cpp_compiler: str = Field(default_factory=lambda: shutil.which("g++") or "/usr/bin/g++")
    cpp_flags: tuple[str, ...] = ("-std=c++17", "-O2", "-pipe")
    bash: str = Field(default_factory=lambda: shutil.which("bash") or "/bin/bash")
    max_queue: int = Field(100_000, ge=0, description="Requests waiting for a worker, at most.")
    grace_s: float = Field(
        5.0, gt=0, description="Extra time past a limit before a silent worker is killed."
    )
    start_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})"
            )
        if self.max_workers > self.uid_count:
            raise ValueError(f"max_workers ({self.max_workers}) exceeds uid_count")
        return self
