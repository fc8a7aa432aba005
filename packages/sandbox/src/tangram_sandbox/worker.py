"""One zygote process seen from the pool: its slot (uid, cgroups), its socket, its death.

Slot uids are leased host-wide with ``flock`` on a lock file per uid, so that two pools (two
trainers on one node) never run code under the same uid; the lock dies with the process that
holds it, so a crashed pool leaks no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from tangram_sandbox import wire
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.isolation import (
    ZYGOTE_ENV,
    cgroup_root,
    package_root,
    rootless_hidden,
    zygote_command,
)

__all__ = ["Slot", "SlotLeases", "WorkerDied", "ZygoteWorker"]


class WorkerDied(Exception):
    """The zygote (or the socket to it) went away in the middle of a request."""


@dataclass
class Slot:
    uid: int
    lock_fd: int
    cgroup_dirs: dict[str, str] = field(default_factory=dict)


class SlotLeases:
    """Leases of slot uids (and their cgroup directories) for one pool."""

    def __init__(self, config: PoolConfig, use_cgroups: dict[str, bool]) -> None:
        self._config = config
        self._use = use_cgroups
        os.makedirs(config.lock_dir, mode=0o700, exist_ok=True)
        # Checked here, at the pool's start: a lease that fails later fails every worker start.
        # Another user's directory would let that user hold our slots, or plant links there.
        info = os.stat(config.lock_dir)
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise PermissionError(
                f"the slot lock dir {config.lock_dir} belongs to uid {info.st_uid} with mode "
                f"{info.st_mode & 0o777:o}; it must be this uid's ({os.geteuid()}) and writable "
                "by it alone: set PoolConfig.lock_dir to a directory of your own"
            )
        self.held: dict[int, Slot] = {}

    def acquire(self) -> Slot:
        cfg = self._config
        for uid in range(cfg.uid_base, cfg.uid_base + cfg.uid_count):
            if uid in self.held:
                continue
            fd = os.open(os.path.join(cfg.lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, False)
            slot = Slot(uid=uid, lock_fd=fd, cgroup_dirs=self._make_cgroups(uid))
            self.held[uid] = slot
            return slot
        raise RuntimeError(
            f"no free sandbox slot uid in [{cfg.uid_base}, {cfg.uid_base + cfg.uid_count}): "
            "raise uid_count or stop other pools"
        )

    def _make_cgroups(self, uid: int) -> dict[str, str]:
        dirs = {}
        for controller, root in cgroup_root().items():
            wanted = self._use.get("memory" if controller != "pids" else "pids", False)
            if controller == "unified":
                wanted = self._use.get("memory", False) or self._use.get("pids", False)
            if not wanted:
                continue
            path = os.path.join(root, "tangram-sandbox", f"slot-{uid}")
            with contextlib.suppress(OSError):
                os.makedirs(path, exist_ok=True)
                dirs[controller] = path
        return dirs

    async def release(self, slot: Slot, timeout_s: float = 2.0) -> None:
        """Give the slot back once its last process is gone (a program dies with its zygote,
        but asynchronously), so that its cgroup directories can be removed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        for path in slot.cgroup_dirs.values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a process is still in it
                    if asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.01)
        os.close(slot.lock_fd)
        self.held.pop(slot.uid, None)


class ZygoteWorker:
    """A started zygote: send it a request, relay jobs, read its frames."""

    def __init__(
        self, slot: Slot, proc: subprocess.Popen[bytes], sock: socket.socket, errlog: IO[bytes]
    ) -> None:
        self.slot = slot
        self._errlog = errlog
        self.proc = proc
        self.pid = proc.pid
        self.layers: dict[str, Any] = {}
        self._sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.dead = False
        self.busy = False

    @classmethod
    async def start(cls, config: PoolConfig, slot: Slot, apply: dict[str, bool]) -> ZygoteWorker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {
            "uid": slot.uid,
            "gid": slot.uid,
            "apply": dict(apply),
            "cache_dir": config.cache_dir,
            "cgroup_dirs": slot.cgroup_dirs,
            "tmp_size_mb": config.tmp_size_mb,
            "cpp": {"compiler": config.cpp_compiler, "flags": list(config.cpp_flags)},
        }
        cfg["drop_sys_path"] = [package_root()]
        if not apply.get("slot_uid"):
            cfg["hide"] = rootless_hidden(config)
        cmd = zygote_command(config.python, str(child.fileno()), cfg)
        errlog = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        proc = subprocess.Popen(
            cmd,
            pass_fds=(child.fileno(),),
            env=ZYGOTE_ENV,  # never the server's: see ZYGOTE_ENV
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errlog,
            start_new_session=True,
        )
        child.close()
        worker = cls(slot, proc, parent, errlog)
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        worker._reader, worker._writer = reader, writer
        try:
            ready = await worker.recv_json(config.start_timeout_s)
        except WorkerDied as exc:
            worker.kill()
            raise WorkerDied(f"sandbox worker failed to start: {worker.stderr_tail()}") from exc
        worker.layers = ready.get("layers", {})
        return worker

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            self._errlog.seek(0)
            return self._errlog.read().decode(errors="replace")[-n:] or "(no output)"
        except (OSError, ValueError):
            return "(no output)"

    async def send(self, data: bytes) -> None:
        """Write encoded frames (the zygote reads them in order)."""
        if self.dead or self._writer is None:
            raise WorkerDied(f"sandbox worker {self.pid} is gone")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self.dead = True
            raise WorkerDied(f"sandbox worker {self.pid} is gone: {exc}") from exc

    async def recv(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """The next frame's kind and body; the worker is killed when none comes in time."""
        assert self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                head = await self._reader.readexactly(wire.TYPED_HEADER.size)
                kind, size = wire.TYPED_HEADER.unpack(head)
                if size > wire.MAX_FRAME:
                    raise wire.FrameError(f"frame of {size} bytes")
                body = await self._reader.readexactly(size)
        except TimeoutError:
            self.kill()
            raise WorkerDied(
                f"sandbox worker {self.pid} did not answer within {timeout:.1f} s; killed"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError, wire.FrameError) as exc:
            self.dead = True
            raise WorkerDied(f"sandbox worker {self.pid} died: {self._exit_text()}") from exc
        return kind, body

    async def recv_json(self, timeout: float | None = None) -> Any:
        kind, body = await self.recv(timeout)
        if kind != wire.JSON:
            self.kill()
            raise WorkerDied(f"sandbox worker {self.pid} sent a {kind!r} frame out of turn")
        return wire.decode(body)

    def _exit_text(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "connection lost"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        """SIGKILL the zygote; its supervisors follow (parent-death signal), and with them
        every process of the running execution (its pid namespace dies with its pid 1)."""
        self.dead = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Close the socket (the zygote exits at end of stream) and reap it."""
        self.dead = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), 5.0)
        except TimeoutError:
            self.kill()
            await loop.run_in_executor(None, self.proc.wait)
        self._errlog.close()
