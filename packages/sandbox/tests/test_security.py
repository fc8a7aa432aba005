"""Attacks a sandboxed program can try against the real pool, and what must still hold after.

Why the real pool and no mocks: every property here is the kernel's (namespaces, seccomp,
rlimits, cgroups, slot uids) as the pool sets it up; a mock would only test itself. Why every
test ends with :meth:`Sandbox.assert_unharmed`: an attack that "fails" but leaves a process, a
slot lease, a mount or a descriptor behind, or a worker that answers wrongly, has still won.

Each pool here leases its slot uids from a private range, so that the processes of other pools
on this host (another test session, a trainer) are never mistaken for our leaks, nor ours for
theirs. Each bug this suite found is fixed, and its test stays as the regression guard.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from host_processes import Proc, processes
from pydantic import ValidationError

from tangram_sandbox import capabilities
from tangram_sandbox.models import RunResult, RunStatus
from tangram_sandbox.pool import SandboxPool
from tangram_sandbox.worker import Slot

T = TypeVar("T")

#: Layers without which these attacks would simply succeed: testing them there is pointless.
_NEEDED = ("pid_ns", "mount_ns", "private_tmp", "seccomp", "slot_uid")


def _why_skip() -> str | None:
    if sys.platform != "linux":
        return "the sandbox needs Linux namespaces"
    if os.geteuid() != 0:
        return "security tests need root: slot uids, cgroups and the host's view of /proc"
    caps = capabilities()
    missing = [name for name in caps.missing() if name in _NEEDED]
    if any("Traceback (most recent call last)" in caps.layer(n).detail for n in missing):
        return None  # the probe crashed: a bug in the sandbox, which the tests must show
    if missing:
        return f"isolation layers missing on this host: {', '.join(missing)}"
    return None


_SKIP = _why_skip()
if _SKIP is not None:
    pytest.skip(_SKIP, allow_module_level=True)

# Private slot-uid ranges (see the module docstring): the 2-worker pool, the 1-worker pool, and
# the pools a single test starts and closes (never two of those at once).
_UID_BASE = 263_000
_SOLO_UID_BASE = 263_100
_SCRATCH_UID_BASE = 263_200
_UID_COUNT = 8

#: Small limits, so that each attack ends in about a second.
SMALL: dict[str, Any] = {"wall_s": 2, "memory_mb": 256, "processes": 32, "output_bytes": 65536}
#: What a worker that survived an attack must still answer correctly.
SANITY = "print(6 * 7)"


# --- the host's view of processes ---------------------------------------------------------------


def in_range(pool: SandboxPool) -> list[Proc]:
    """Live (non-zombie) processes whose real uid is in ``pool``'s slot range. Zombies are left
    out: they run nothing, hold no memory, and reaping orphans is the host init's job."""
    lo, count = pool.config.uid_base, pool.config.uid_count
    return [p for p in processes().values() if lo <= p.uid < lo + count and p.state != "Z"]


def named(pool: SandboxPool, name: str) -> list[Proc]:
    """Processes of ``pool``'s slot range that renamed themselves ``name`` (see ``VICTIM``)."""
    return [p for p in in_range(pool) if p.name == name]


def kill_all(procs: list[Proc]) -> None:
    """Clean up after a test that found a leak, so that it does not poison the next one."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def _zygote_of(proc: Proc, procs: dict[int, Proc], zygote_uid: dict[int, int]) -> int | None:
    """The zygote ``proc`` is a spare of (see :func:`leftovers`), or None."""
    parent = procs.get(proc.ppid)
    if parent is not None and parent.uid == 0 and parent.pid not in zygote_uid:
        parent = procs.get(parent.ppid)  # through a root supervisor
    if parent is not None and zygote_uid.get(parent.pid) == proc.uid:
        return parent.pid
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def leftovers(pool: SandboxPool) -> list[str]:
    """What a finished execution left behind: slot-uid processes other than the idle workers'
    spare programs, and slot-owned files in the host's ``/tmp``.

    A spare is the one process a worker may keep forked ahead of its next request, with the
    worker's slot uid: a child of its live zygote, or of a root supervisor that the zygote
    forked. A daemon that escaped would instead hang off the program (or the host's init)."""
    procs = processes()
    zygote_uid = {w.pid: w.slot.uid for w in pool._workers}
    spares: dict[int, list[int]] = {}
    problems = []
    for proc in in_range(pool):
        zygote = _zygote_of(proc, procs, zygote_uid)
        if zygote is not None:
            spares.setdefault(zygote, []).append(proc.pid)
        else:
            problems.append(f"stray process {proc}")
    problems += [
        f"zygote {z} keeps {len(pids)} slot-uid children {pids} (one spare at most)"
        for z, pids in spares.items()
        if len(pids) > 1
    ]
    lo, count = pool.config.uid_base, pool.config.uid_count
    with os.scandir("/tmp") as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if lo <= entry.stat(follow_symlinks=False).st_uid < lo + count:
                    problems.append(f"host file {entry.path} owned by a slot uid")
    return problems


async def eventually(predicate: Callable[[], T], timeout: float) -> T:
    """The first truthy value of ``predicate``, polled; its last value when time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


def _mount_count() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the pools under attack ----------------------------------------------------------------------


@dataclass(frozen=True)
class PoolState:
    """What an attack must not change (see :meth:`Sandbox.assert_unharmed`)."""

    worker_pids: frozenset[int]
    replaced: int
    fds: int
    mounts: int


@dataclass
class Sandbox:
    """A started pool and the event loop it lives on, driven from synchronous tests (this
    repository has no pytest-asyncio; a loop per module keeps one warm pool for all tests)."""

    runner: asyncio.Runner
    pool: SandboxPool

    def wait(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the pool's loop; a hang fails the test instead of blocking it."""
        return self.runner.run(asyncio.wait_for(coro, timeout))

    def run(self, code: str, language: str = "python", **fields: Any) -> RunResult:
        return self.wait(self.pool.run(code=code, language=language, **fields))

    def timed(self, code: str, language: str = "python", **fields: Any) -> tuple[RunResult, float]:
        """A run and how long the caller waited for it."""
        start = time.monotonic()
        result = self.run(code, language, **fields)
        return result, time.monotonic() - start

    def state(self) -> PoolState:
        return PoolState(
            worker_pids=frozenset(w.pid for w in self.pool._workers),
            replaced=self.pool.replaced,
            fds=_fd_count(),
            mounts=_mount_count(),
        )

    def assert_unharmed(self, before: PoolState, replaced: int = 0) -> None:
        """The pool still answers correctly, with ``replaced`` workers replaced and nothing
        leaked: no process, file, slot lease, mount or descriptor."""
        pool = self.pool
        sane = self.run(SANITY)
        assert (sane.status, sane.stdout) == (RunStatus.OK, "42\n"), sane
        clean = self.wait(eventually(lambda: not leftovers(pool), 3.0))
        assert clean, leftovers(pool)
        assert pool.size == pool.target, (pool.size, pool.target)
        assert pool.replaced == before.replaced + replaced
        workers = {w.pid for w in pool._workers}
        if replaced == 0:
            assert workers == before.worker_pids, "a worker died or was replaced"
        assert all(_alive(pid) for pid in workers)
        assert not any(_alive(pid) for pid in before.worker_pids - workers)
        held = pool._leases.held if pool._leases is not None else {}
        assert set(held) == {w.slot.uid for w in pool._workers}, "slot lease leaked or lost"
        assert len(held) == pool.size
        assert _mount_count() == before.mounts, "the host's mount table changed"
        # a leak adds descriptors; one fewer is something else in the process (an earlier
        # test's loop or thread) closing its own, which CI has seen
        fds = self.wait(eventually(lambda: _fd_count() <= before.fds, 2.0))
        assert fds, f"this process holds {_fd_count()} descriptors, {before.fds} before"


@contextlib.contextmanager
def started(uid_base: int, workers: int, tidy: bool = True) -> Iterator[Sandbox]:
    """A started pool, closed on exit; with ``tidy``, then rid of the slot cgroups that a
    close leaves behind (see ``test_closing_the_pool_removes_its_cgroups``)."""
    cgroups: set[str] = set()
    with asyncio.Runner() as runner:
        pool = SandboxPool(
            min_workers=workers, max_workers=workers, uid_base=uid_base, uid_count=_UID_COUNT
        )
        runner.run(asyncio.wait_for(pool.start(), 60))
        try:
            yield Sandbox(runner, pool)
        finally:
            cgroups.update(d for w in pool._workers for d in w.slot.cgroup_dirs.values())
            runner.run(asyncio.wait_for(pool.close(), 60))
    deadline = time.monotonic() + 1.0
    while tidy and any(os.path.exists(d) for d in cgroups) and time.monotonic() < deadline:
        time.sleep(0.05)
        for cgroup in cgroups:
            with contextlib.suppress(OSError):
                os.rmdir(cgroup)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """The 2-worker pool most attacks target."""
    with started(_UID_BASE, 2) as sb:
        yield sb


@pytest.fixture(scope="module")
def solo() -> Iterator[Sandbox]:
    """One worker: consecutive runs are sure to share it."""
    with started(_SOLO_UID_BASE, 1) as sb:
        yield sb


def report(result: RunResult) -> Any:
    """The JSON a probe program printed (with the run in the message when it printed none)."""
    assert result.status is RunStatus.OK, result
    return json.loads(result.stdout)


# --- 1. fork bombs -------------------------------------------------------------------------------

FORK_UNTIL_FAIL = "import os\nwhile True:\n    os.fork()\n"
FORK_FOREVER = (
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)


@pytest.mark.parametrize(
    ("language", "code", "statuses"),
    [
        # Every process stops at its first failed fork: the program ends in error.
        ("python", FORK_UNTIL_FAIL, {RunStatus.RUNTIME_ERROR, RunStatus.TIMEOUT}),
        # Processes that ignore failed forks never end: only the wall clock stops them.
        ("python", FORK_FOREVER, {RunStatus.TIMEOUT}),
        # The script's shell returns as soon as the first pipeline is backgrounded, so it may
        # well exit 0; what matters is that the bomb dies with it.
        ("bash", ":(){ :|:& };:", {RunStatus.OK, RunStatus.RUNTIME_ERROR, RunStatus.TIMEOUT}),
        ("bash", ":(){ :|:& };:\nsleep 30", {RunStatus.TIMEOUT}),
    ],
    ids=["python_until_fail", "python_forever", "bash", "bash_then_sleep"],
)
def test_fork_bomb_ends_and_leaves_no_process(
    sandbox: Sandbox, language: str, code: str, statuses: set[RunStatus]
) -> None:
    before = sandbox.state()
    result, took = sandbox.timed(code, language, limits=dict(SMALL, wall_s=1))
    assert result.status in statuses, result
    assert took < 1 + 2.0, "the pool waited past the wall limit: a silent worker was killed"
    sandbox.assert_unharmed(before)


def test_fork_bomb_does_not_starve_the_other_slot(sandbox: Sandbox) -> None:
    """Process limits are per slot (uid and cgroup): a bomb in one worker must leave the other
    able to fork."""
    before = sandbox.state()
    neighbour = (
        "import os\n"
        "pids = [os.fork() for _ in range(4)]\n"
        "if 0 in pids:\n    os._exit(0)\n"
        "for pid in pids:\n    os.waitpid(pid, 0)\n"
        "print('forked fine')\n"
    )

    async def both() -> tuple[RunResult, RunResult]:
        bomb = asyncio.create_task(sandbox.pool.run(code=FORK_FOREVER, limits=dict(SMALL)))
        await asyncio.sleep(0.5)  # the bomb has used up its slot's processes by now
        ok = await sandbox.pool.run(code=neighbour, limits=SMALL)
        return await bomb, ok

    bomb, ok = sandbox.wait(both())
    assert bomb.status is RunStatus.TIMEOUT, bomb
    assert (ok.status, ok.stdout) == (RunStatus.OK, "forked fine\n"), ok
    sandbox.assert_unharmed(before)


# --- 2. memory bombs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(1 << 30)\n",
        "x = 'x' * (1 << 30)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n",
    ],
    ids=["one_gib_bytearray", "one_gib_str", "growing_list"],
)
def test_memory_bomb_is_memory_limit(sandbox: Sandbox, code: str) -> None:
    before = sandbox.state()
    result, took = sandbox.timed(code, limits=dict(SMALL, memory_mb=256, wall_s=5))
    assert result.status is RunStatus.MEMORY_LIMIT, result
    assert took < 4.0, "the limit should stop it long before the wall clock"
    if result.exit_code == 1:  # Python's MemoryError (not the kernel's kill): say so, as Python
        assert result.stderr.endswith("MemoryError\n"), result.stderr
    sandbox.assert_unharmed(before)


# --- 3. infinite loops ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass\n",
        "import time\nwhile True:\n    time.sleep(0.05)\n",
        "import signal, time\n"
        "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(sig, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(0.05)\n",
    ],
    ids=["busy", "sleeping", "ignoring_signals"],
)
def test_infinite_loop_times_out_at_the_wall_limit(sandbox: Sandbox, code: str) -> None:
    before = sandbox.state()
    result, took = sandbox.timed(code, limits=dict(SMALL, wall_s=1))
    assert result.status is RunStatus.TIMEOUT, result
    assert 0.9 <= result.wall_s <= 1.5, result.wall_s
    assert took < 3.0
    sandbox.assert_unharmed(before)


# --- 4. output floods ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "code", "stream", "line"),
    [
        ("python", "while True:\n    print('x' * 1000)\n", "stdout", "x" * 1000 + "\n"),
        ("bash", "yes xxxxxxxx", "stdout", "xxxxxxxx\n"),
        ("python", "import sys\nwhile True:\n    sys.stderr.write('e' * 9)\n", "stderr", "e" * 9),
    ],
    ids=["python_print", "bash_yes", "python_stderr"],
)
def test_an_endless_flood_is_cut_at_the_cap_and_stopped_by_the_clock(
    sandbox: Sandbox, language: str, code: str, stream: str, line: str
) -> None:
    """Past the cap the supervisor keeps the first bytes and drops the rest, so neither its
    memory nor the reply grows; a program that never stops is stopped by its wall limit, and
    that is the program's timeout, never the sandbox's error."""
    before = sandbox.state()
    result, took = sandbox.timed(code, language, limits=dict(SMALL, wall_s=1.5))
    kept = getattr(result, stream)
    assert getattr(result, f"{stream}_truncated")
    assert 0 < len(kept.encode()) <= 65536
    assert kept.startswith(line * 3)
    assert result.status is RunStatus.TIMEOUT, result
    assert took < 1.5 + 3.0
    sandbox.assert_unharmed(before)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_program_that_talks_too_much_still_finishes(sandbox: Sandbox, stream: str) -> None:
    """SandboxFusion's behaviour: output over the cap is cut and flagged, and the program runs
    to its end (here: 4 MiB written, then a file and exit 0), rather than dying of a broken
    pipe for the sole fault of talking too much."""
    before = sandbox.state()
    other = "stderr" if stream == "stdout" else "stdout"
    code = (
        "import sys\n"
        f"out = sys.{stream}\n"
        "for _ in range(4096):\n"
        "    out.write('y' * 1023 + '\\n')\n"
        "out.flush()\n"
        "open('finished', 'w').write('yes')\n"
        f"print('after the flood', file=sys.{other})\n"
    )
    result = sandbox.run(code, limits=SMALL, fetch_files=["finished"])
    assert result.status is RunStatus.OK, result
    assert result.exit_code == 0
    assert getattr(result, f"{stream}_truncated") is True
    assert not getattr(result, f"{other}_truncated")
    kept = getattr(result, stream)
    assert len(kept.encode()) == 65536
    assert kept == ("y" * 1023 + "\n") * 64
    assert getattr(result, other) == "after the flood\n"
    assert base64.b64decode(result.files["finished"]) == b"yes"
    sandbox.assert_unharmed(before)


# --- 5. writing outside the working directory ----------------------------------------------------

WRITE_PROBE = """
import json
result = {}
for path in json.loads(PATHS):
    try:
        with open(path, "a") as f:
            f.write("escaped")
        result[path] = "written"
    except OSError as exc:
        result[path] = exc.__class__.__name__
print(json.dumps(result))
"""


def test_writes_outside_the_working_dir_fail_and_never_reach_the_host(sandbox: Sandbox) -> None:
    """The root is read-only, the compile cache and cgroup files (writable holes kept for the
    supervisor) are closed to the slot uid, and /tmp and /dev/shm are private tmpfs."""
    before = sandbox.state()
    tag = f"tangram-escape-{uuid.uuid4().hex[:12]}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = ["/", "/etc", "/usr", "/work", "/root", "/var/tmp", repo, sandbox.pool.config.cache_dir]
    outside = [os.path.join(d, tag) for d in dirs] + ["/etc/passwd"]
    cgroup_files = []
    for worker in sandbox.pool._workers:
        for cgroup in worker.slot.cgroup_dirs.values():
            for name in ("cgroup.procs", "memory.limit_in_bytes", "memory.max", "pids.max"):
                if os.path.exists(os.path.join(cgroup, name)):
                    cgroup_files.append(os.path.join(cgroup, name))
            outside.append(os.path.join(cgroup, tag))
    inside = [f"/tmp/work/{tag}", f"/tmp/{tag}", f"/dev/shm/{tag}"]
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    code = f"PATHS = {json.dumps(outside + cgroup_files + inside)!r}\n" + WRITE_PROBE
    result = sandbox.run(code, limits=SMALL, fetch_files=[tag])
    got = report(result)
    for path in outside + cgroup_files:
        assert got[path] != "written", f"the sandbox wrote {path}"
    for path in inside:
        assert got[path] == "written", f"the sandbox could not write its own {path}"
    assert base64.b64decode(result.files[tag]) == b"escaped"
    for path in outside + inside:
        if path != "/etc/passwd":
            assert not os.path.exists(path), f"{path} appeared on the host"
    with open("/etc/passwd", "rb") as f:
        assert f.read() == passwd
    sandbox.assert_unharmed(before)


def test_fetching_files_cannot_follow_links_out_of_the_working_dir(sandbox: Sandbox) -> None:
    """The supervisor fetches files as root: a link planted by the program must not make it
    read a root-only file (``/etc/shadow``) on the program's behalf."""
    before = sandbox.state()
    code = (
        "import os\n"
        "os.symlink('/etc/shadow', 'shadow')\n"
        "os.symlink('/etc', 'etc')\n"
        "os.mkdir('d')\n"
        "os.symlink('/etc/shadow', 'd/shadow')\n"
        "os.symlink('/root', 'root')\n"
    )
    fetch = ["shadow", "etc/shadow", "d/shadow", "root/.bashrc"]
    result = sandbox.run(code, limits=SMALL, fetch_files=fetch)
    assert result.status is RunStatus.OK, result
    assert result.files == {}
    assert result.error is not None
    assert all(name in result.error for name in fetch), result.error
    for name in ("../../etc/shadow", "/etc/shadow", "d/../shadow", "a\x00b"):
        with pytest.raises(ValidationError, match="fetch_files"):
            sandbox.run(code, limits=SMALL, fetch_files=[name])
    sandbox.assert_unharmed(before)


# --- 6. files of earlier executions --------------------------------------------------------------

LOOK_AROUND = """
import json, os
seen = {}
for d in ("/tmp", "/tmp/work", "/dev/shm"):
    try:
        seen[d] = sorted(os.listdir(d))
    except OSError as exc:
        seen[d] = exc.__class__.__name__
print(json.dumps(seen))
"""


@pytest.mark.parametrize("ending", ["exits", "times_out"])
def test_an_execution_cannot_see_the_files_of_the_previous_one(solo: Sandbox, ending: str) -> None:
    """Same worker, consecutive requests: each gets a fresh /tmp, /tmp/work and /dev/shm, even
    when the first was killed at its deadline rather than finishing."""
    before = solo.state()
    secret = uuid.uuid4().hex
    first = (
        f"open('/tmp/work/secret.txt', 'w').write({secret!r})\n"
        f"open('/tmp/secret2', 'w').write({secret!r})\n"
        f"open('/dev/shm/secret3', 'w').write({secret!r})\n"
        "print('planted', flush=True)\n"
    ) + ("while True:\n    pass\n" if ending == "times_out" else "")
    planted = solo.run(first, limits=dict(SMALL, wall_s=1), fetch_files=["secret.txt"])
    expected = RunStatus.TIMEOUT if ending == "times_out" else RunStatus.OK
    assert (planted.status, planted.stdout) == (expected, "planted\n"), planted
    assert base64.b64decode(planted.files["secret.txt"]).decode() == secret
    second = solo.run(LOOK_AROUND, limits=SMALL, fetch_files=["secret.txt"])
    seen = report(second)
    assert seen == {"/tmp": ["work"], "/tmp/work": ["main.py"], "/dev/shm": []}
    assert second.files == {}
    assert {w.pid for w in solo.pool._workers} == before.worker_pids, "not the same worker"
    solo.assert_unharmed(before)


# --- 7. network ----------------------------------------------------------------------------------

NET_PROBE = """
import errno, json, socket, sys
out = {}
families = {
    "inet_tcp": (socket.AF_INET, socket.SOCK_STREAM),
    "inet_udp": (socket.AF_INET, socket.SOCK_DGRAM),
    "inet6": (socket.AF_INET6, socket.SOCK_STREAM),
    "netlink": (socket.AF_NETLINK, socket.SOCK_RAW),
    "packet": (socket.AF_PACKET, socket.SOCK_RAW),
}
for name, (family, kind) in families.items():
    try:
        socket.socket(family, kind).close()
        out[name] = "created"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
    out["connect_tcp"] = "connected"
except OSError as exc:
    out["connect_tcp"] = exc.__class__.__name__
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    unix.connect(ABSTRACT)
    out["connect_abstract_unix"] = "connected"
except OSError as exc:
    out["connect_abstract_unix"] = exc.__class__.__name__
with open("/proc/net/dev") as f:
    out["interfaces"] = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
print(json.dumps(out))
"""


def test_the_network_is_out_of_reach(sandbox: Sandbox) -> None:
    """Seccomp refuses every socket family but AF_UNIX, and the network namespace has only a
    loopback; a host listener on 127.0.0.1 or an abstract unix socket sees no connection.

    (``/sys/class/net`` still lists the host's interfaces: sysfs was mounted in the host's
    network namespace. Names only; ``/proc/net/dev`` is the namespace's own view.)"""
    before = sandbox.state()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with tcp, abstract:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        name = f"\0tangram-security-{uuid.uuid4().hex}"
        abstract.bind(name)
        abstract.listen()
        abstract.setblocking(False)
        port = tcp.getsockname()[1]
        code = f"PORT = {port}\nABSTRACT = {name!r}\n" + NET_PROBE
        got = report(sandbox.run(code, limits=SMALL))
        for listener in (tcp, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()
    for family in ("inet_tcp", "inet_udp", "inet6", "netlink", "packet"):
        assert got[family] == "EPERM", got
    assert got["connect_tcp"] == "PermissionError", got
    assert got["connect_abstract_unix"] != "connected", got
    if capabilities().available("net_ns"):
        assert got["interfaces"] == ["lo"], got
    sandbox.assert_unharmed(before)


# --- 8. daemons ----------------------------------------------------------------------------------

DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if DETACH:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
        time.sleep(1.0)
        print("LATE", flush=True)
        open("/tmp/work/late.txt", "w").write("late")
        time.sleep(30)
    os._exit(0)
time.sleep(0.2)
print("main done", flush=True)
"""


@pytest.mark.parametrize("detach", [False, True], ids=["keeps_stdout", "detached"])
def test_setsid_daemons_die_with_the_run(sandbox: Sandbox, detach: bool) -> None:
    """A double-forked, setsid daemon is still in the program's pid namespace, which dies with
    its pid 1: right after the result comes back, nothing of the program may remain.

    "Right after": the zygote answers at the program's exit_group and lets its pid 1 finish
    dying after the answer (and before the worker's next program), so the daemon goes within
    a millisecond or so of the reply; it must never live to its late write."""
    before = sandbox.state()
    code = f"DETACH = {detach}\n" + DAEMON
    result, took = sandbox.timed(code, limits=dict(SMALL, wall_s=5), fetch_files=["late.txt"])
    clean = sandbox.wait(eventually(lambda: not leftovers(sandbox.pool), 0.3))
    assert clean, f"the run left these behind: {leftovers(sandbox.pool)}"
    assert (result.status, result.stdout) == (RunStatus.OK, "main done\n"), result
    assert result.files == {}
    assert took < 2.0, "the run waited on its daemon"
    time.sleep(1.2)  # past the daemon's wake-up: had it survived, it would show now
    sandbox.assert_unharmed(before)


# --- 9. the worker dies mid-run ------------------------------------------------------------------

#: A long run that names itself, so that the host can find it among the slot's processes.
VICTIM = (
    "import ctypes, time\n"
    "ctypes.CDLL(None).prctl(15, b'tg-victim', 0, 0, 0)  # PR_SET_NAME\n"
    "time.sleep(30)\n"
    "print('woke up')\n"
)


def test_killing_the_worker_mid_run_is_sandbox_error_and_it_is_replaced(
    sandbox: Sandbox,
) -> None:
    pool = sandbox.pool
    before = sandbox.state()

    async def scenario() -> tuple[RunResult, float, int]:
        task = asyncio.create_task(pool.run(code=VICTIM, limits={"wall_s": 60}))
        victims = await eventually(lambda: named(pool, "tg-victim"), 10.0)
        assert victims, "the victim program never started"
        worker = next(w for w in pool._workers if w.slot.uid == victims[0].uid)
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        result = await task
        took = time.monotonic() - killed
        replaced = await eventually(
            lambda: pool.replaced == before.replaced + 1 and pool.size == pool.target, 5.0
        )
        assert replaced, (pool.replaced, pool.size)
        return result, took, worker.pid

    try:
        result, took, victim = sandbox.wait(scenario())
        assert result.status is RunStatus.SANDBOX_ERROR, result
        assert result.stdout == "", "a result from a dead worker"
        assert result.exit_code is None
        assert took < 2.0, "the pool noticed the death late"
        assert victim not in {w.pid for w in pool._workers}
        after = sandbox.run(SANITY)
        assert (after.status, after.stdout) == (RunStatus.OK, "42\n")
    finally:
        # Belt and braces: a program left behind would be another test's failure.
        kill_all(named(pool, "tg-victim"))
    sandbox.assert_unharmed(before, replaced=1)


@pytest.mark.parametrize("how", ["kill_zygote", "cancel_run", "close_without_drain"])
def test_a_program_never_outlives_its_worker(how: str) -> None:
    with started(_SCRATCH_UID_BASE, 1) as sb:
        pool = sb.pool

        async def scenario() -> list[Proc]:
            task = asyncio.create_task(pool.run(code=VICTIM, limits={"wall_s": 60}))
            assert await eventually(lambda: named(pool, "tg-victim"), 10.0)
            if how == "kill_zygote":
                os.kill(next(iter(pool._workers)).pid, signal.SIGKILL)
            elif how == "cancel_run":
                task.cancel()
            else:
                await pool.close(drain=False)
            with contextlib.suppress(asyncio.CancelledError):
                result = await task
                assert result.status is RunStatus.SANDBOX_ERROR, result
            await eventually(lambda: not named(pool, "tg-victim"), 3.0)
            return named(pool, "tg-victim")

        try:
            survivors = sb.wait(scenario())
            assert not survivors, f"the program outlived its worker: {survivors}"
        finally:
            kill_all(named(pool, "tg-victim"))


# --- 10. load ------------------------------------------------------------------------------------


def test_a_thousand_concurrent_programs_each_get_their_own_answer(sandbox: Sandbox) -> None:
    """A queue 500 deep per worker: no result is lost, duplicated or given to another request."""
    before = sandbox.state()

    async def flood() -> list[RunResult]:
        runs = [sandbox.pool.run(code=f"print({i} * {i})", limits=SMALL) for i in range(1000)]
        return await asyncio.gather(*runs)

    results = sandbox.wait(flood(), timeout=180)
    assert [r.status for r in results] == [RunStatus.OK] * 1000
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(1000)]
    sandbox.assert_unharmed(before)


# --- privileges ----------------------------------------------------------------------------------

SYSCALL_PROBE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    ctypes.set_errno(0)
    ret = getattr(libc, name)(*args)
    return [ret, errno.errorcode.get(ctypes.get_errno(), "0")]
net = os.open("/proc/self/ns/net", os.O_RDONLY)
out = {
    "ptrace_traceme": call("ptrace", 0, 0, None, None),
    "ptrace_attach_pid1": call("ptrace", 16, 1, None, None),
    "mount_tmpfs": call("mount", b"tmpfs", b"/tmp/work", b"tmpfs", 0, None),
    "remount_root_rw": call("mount", None, b"/", None, 32, None),
    "umount_proc": call("umount2", b"/proc", 2),
    "unshare_user": call("unshare", 0x10000000),
    "unshare_mount": call("unshare", 0x00020000),
    "unshare_net": call("unshare", 0x40000000),
    "unshare_pid": call("unshare", 0x20000000),
    "setns_net": call("setns", net, 0),
    "chroot": call("chroot", b"/tmp"),
}
try:
    os.setuid(0)
    out["setuid_root"] = "became root"
except OSError as exc:
    out["setuid_root"] = exc.__class__.__name__
print(json.dumps(out))
"""


def test_ptrace_mount_and_namespace_calls_are_denied(sandbox: Sandbox) -> None:
    before = sandbox.state()
    got = report(sandbox.run(SYSCALL_PROBE, limits=SMALL))
    setuid = got.pop("setuid_root")
    assert got == {name: [-1, "EPERM"] for name in got}, got
    assert setuid != "became root"
    sandbox.assert_unharmed(before)


IDENTITY_PROBE = """
import ctypes, json, os, socket, time
ctypes.CDLL(None).prctl(15, b"tg-ident", 0, 0, 0)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "pid": os.getpid(),
    "procs": sorted(p for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(),
    "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
}), flush=True)
time.sleep(1.0)
"""


def test_programs_run_unprivileged_each_slot_under_its_own_uid(sandbox: Sandbox) -> None:
    """Inside: not root, pid 1 of a namespace that shows nothing else, no_new_privs, seccomp.
    From the host: two concurrent programs run under two different slot uids, neither 0."""
    before = sandbox.state()

    async def pair() -> tuple[list[RunResult], list[Proc]]:
        runs = asyncio.gather(*(sandbox.pool.run(code=IDENTITY_PROBE) for _ in range(2)))
        seen = await eventually(lambda: len(named(sandbox.pool, "tg-ident")) == 2, 5.0)
        procs = named(sandbox.pool, "tg-ident") if seen else []
        return list(await runs), procs

    results, procs = sandbox.wait(pair())
    for got in map(report, results):
        assert 0 not in (got["uid"], got["euid"], got["gid"]), got
        assert got["pid"] == 1, got
        assert "1" in got["procs"], got["procs"]
        assert len(got["procs"]) <= 2, got["procs"]
        assert (got["no_new_privs"], got["seccomp"]) == ("1", "2"), got
        if capabilities().available("uts_ns"):
            assert got["hostname"] != socket.gethostname()
    assert len(procs) == 2, "both programs should have been running at once"
    held = set(sandbox.pool._leases.held) if sandbox.pool._leases is not None else set()
    assert {p.uid for p in procs} == held, (procs, held)
    assert len({p.uid for p in procs}) == 2
    assert 0 not in {p.uid for p in procs}
    sandbox.assert_unharmed(before)


@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("python", 'import os\nos.write(3, b\'{"setup_error": "forged"}\')\n'),
        ("bash", 'echo \'{"setup_error": "forged"}\' >&3'),
        ("python", "import os\nos.write(3, b'{\"memory_error\": true}')\n"),
    ],
    ids=["python_sandbox_error", "bash_sandbox_error", "python_memory_limit"],
)
def test_a_program_cannot_forge_its_status(sandbox: Sandbox, language: str, code: str) -> None:
    """A program that exits 0 is ``ok``: whatever it writes, it cannot pass for an
    infrastructure failure (which a trainer drops rather than scores) or a memory kill."""
    before = sandbox.state()
    result = sandbox.run(code, language, limits=SMALL)
    assert result.status is RunStatus.OK, result
    sandbox.assert_unharmed(before)


# --- the same attacks through run_tests ---------------------------------------------------------

ECHO_AFTER_DAEMON = DAEMON.replace('print("main done", flush=True)', "print(input())")


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        ("DETACH = False\n" + ECHO_AFTER_DAEMON, RunStatus.OK),
        (FORK_FOREVER, RunStatus.TIMEOUT),
        ("x = bytearray(1 << 30)\n", RunStatus.MEMORY_LIMIT),
    ],
    ids=["daemon", "fork_bomb", "memory_bomb"],
)
def test_run_tests_contains_each_attack_and_judges_it(
    sandbox: Sandbox, code: str, verdict: RunStatus
) -> None:
    """A batch shares one sandbox between its tests: an attack in one test must still be that
    test's verdict, and leave nothing behind once the batch is over."""
    before = sandbox.state()
    tests = [{"stdin": str(i), "expected_stdout": str(i)} for i in range(2)]
    limits = dict(SMALL, wall_s=1)
    result = sandbox.wait(sandbox.pool.run_tests(code=code, tests=tests, limits=limits))
    assert result.status is RunStatus.OK, result
    assert [v.status for v in result.verdicts] == [verdict, verdict], result.verdicts
    assert result.passed == (2 if verdict is RunStatus.OK else 0)
    sandbox.assert_unharmed(before)


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.write(3, b'garbage')\nprint(input())\n",
        'import os\nos.write(3, b\'{"setup_error": "forged"}\\n\')\nprint(input())\n',
        "import sys\nprint(input(), flush=True)\nwhile True:\n    sys.stderr.write('e' * 1000)\n",
    ],
    ids=["garbage", "forged_record", "stderr_flood"],
)
def test_a_program_cannot_turn_its_batch_into_a_sandbox_error(sandbox: Sandbox, code: str) -> None:
    before = sandbox.state()
    tests = [{"stdin": str(i), "expected_stdout": str(i)} for i in range(2)]
    result = sandbox.wait(sandbox.pool.run_tests(code=code, tests=tests, limits=SMALL))
    assert result.status is RunStatus.OK, result
    assert RunStatus.SANDBOX_ERROR not in {v.status for v in result.verdicts}, result.verdicts
    sandbox.assert_unharmed(before)


# --- the pool's own end -------------------------------------------------------------------------


def _close_a_used_pool() -> tuple[SandboxPool, set[int], list[Slot]]:
    """Start a 2-worker pool, run once, close it; the pool, its zygote pids and its slots."""
    with started(_SCRATCH_UID_BASE, 2, tidy=False) as sb:
        result = sb.run(SANITY)
        assert (result.status, result.stdout) == (RunStatus.OK, "42\n")
        zygotes = {w.pid for w in sb.pool._workers}
        slots = [w.slot for w in sb.pool._workers]
    return sb.pool, zygotes, slots


def test_closing_the_pool_releases_every_process_and_slot() -> None:
    fds, mounts = _fd_count(), _mount_count()
    pool, zygotes, slots = _close_a_used_pool()
    assert not any(_alive(pid) for pid in zygotes)
    deadline = time.monotonic() + 3.0  # spares end when their job pipe reads end-of-file
    while in_range(pool) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not in_range(pool), in_range(pool)
    for slot in slots:
        fd = os.open(os.path.join(pool.config.lock_dir, f"{slot.uid}.lock"), os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pytest.fail(f"slot uid {slot.uid} is still leased")
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    assert (_fd_count(), _mount_count()) == (fds, mounts)


def test_closing_the_pool_removes_its_cgroups() -> None:
    _, _, slots = _close_a_used_pool()
    left = [d for slot in slots for d in slot.cgroup_dirs.values() if os.path.exists(d)]
    time.sleep(0.2)
    for cgroup in left:  # clean up, so that the next run starts from a clean slate
        with contextlib.suppress(OSError):
            os.rmdir(cgroup)
    assert not left, f"cgroups left behind: {left}"


# --- 12. the privileged side never resolves a program's names -----------------------------------

SWAP_WORKDIR = """
import os
open("mine.txt", "w").write("the program's own file")
os.chdir("/")
os.rename("/tmp/work", "/tmp/old")
os.symlink(TARGET, "/tmp/work")
"""


@pytest.mark.parametrize(
    ("target", "fetch"),
    [
        ("/etc", ["shadow", "passwd", "hostname"]),
        ("/root", [".bashrc", ".profile"]),
        ("/proc/1/root/etc", ["shadow"]),
    ],
    ids=["etc", "root_home", "proc_root"],
)
def test_fetch_reads_the_programs_own_directory_even_when_it_swaps_the_path(
    sandbox: Sandbox, target: str, fetch: list[str]
) -> None:
    """The critical hole: the program renames its working directory and puts a link to a
    host directory in its place. The supervisor (root) must still read from the directory
    it made, never through the link: ``mine.txt`` comes back, no host file does."""
    before = sandbox.state()
    code = f"TARGET = {target!r}\n" + SWAP_WORKDIR
    result = sandbox.run(code, limits=SMALL, fetch_files=[*fetch, "mine.txt"])
    assert result.status is RunStatus.OK, result
    assert base64.b64decode(result.files.pop("mine.txt")) == b"the program's own file"
    assert result.files == {}, f"host files came back: {sorted(result.files)}"
    assert result.error is not None
    assert all(name in result.error for name in fetch), result.error
    sandbox.assert_unharmed(before)


def test_fetch_refuses_links_fifos_and_hard_links_planted_in_subdirectories(
    sandbox: Sandbox,
) -> None:
    """Links at any depth, a FIFO (which would block a reader) and a hard link attempt to a
    host file: nothing the program plants makes the supervisor read outside its tmpfs."""
    before = sandbox.state()
    code = (
        "import os\n"
        "os.makedirs('a/b')\n"
        "os.symlink('/etc', 'a/link')\n"
        "os.symlink('/etc/shadow', 'a/b/shadow')\n"
        "os.mkfifo('pipe')\n"
        "try:\n"
        "    os.link('/etc/passwd', 'hard')\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
        "open('a/b/ok', 'w').write('fine')\n"
    )
    fetch = ["a/link/shadow", "a/b/shadow", "pipe", "hard", "a/b/ok"]
    result, took = sandbox.timed(code, limits=SMALL, fetch_files=fetch)
    assert result.status is RunStatus.OK, result
    assert result.stdout.strip() in {"PermissionError", "OSError"}, result.stdout
    assert set(result.files) == {"a/b/ok"}
    assert base64.b64decode(result.files["a/b/ok"]) == b"fine"
    assert took < 5.0, "a FIFO made the supervisor wait"
    sandbox.assert_unharmed(before)


# --- 13. nothing of the server in a program ------------------------------------------------------

#: Scans the program's own memory for the secret, given in two halves that are never joined
#: in the program's own memory: a hit is a place where the second half follows the first.
MEMORY_SCAN = """
import ctypes, json, os
found = {"environ": any(HEAD in v for v in os.environ.values())}
try:
    with open("/proc/self/environ", "rb") as f:
        found["proc_environ"] = HEAD.encode() in f.read()
except PermissionError:  # the program is not dumpable: closed even to itself
    found["proc_environ"] = "denied"
head, tail = HEAD.encode(), TAIL.encode()
hits = scanned = 0
with open("/proc/self/maps") as maps:
    regions = [line.split() for line in maps]
for fields in regions:
    name = fields[5] if len(fields) > 5 else ""
    if not fields[1].startswith("r") or name in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
        continue
    if name.startswith("/") and not name.startswith("/dev/shm"):
        continue  # file mappings (libraries, the interpreter): the same bytes as on disk
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    chunk = ctypes.string_at(lo, hi - lo)
    scanned += len(chunk)
    at = chunk.find(head)
    while at >= 0:
        hits += chunk[at + len(head) : at + len(head) + len(tail)] == tail
        at = chunk.find(head, at + 1)
found["memory_hits"] = hits
found["scanned_mb"] = scanned >> 20
print(json.dumps(found))
"""


def test_the_servers_environment_is_nowhere_in_a_programs_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python programs are forks of the zygote: if the zygote inherited the server's
    environment, its token would sit on every program's stack, readable by a memory scan."""
    secret = f"tg-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TANGRAM_API_TOKEN", secret)
    monkeypatch.setenv("SOME_OTHER_SERVER_SETTING", secret)
    half = len(secret) // 2
    code = f"HEAD = {secret[:half]!r}\nTAIL = {secret[half:]!r}\n" + MEMORY_SCAN
    with started(_SCRATCH_UID_BASE, 1) as sb:
        found = report(sb.run(code, limits=dict(SMALL, memory_mb=512)))
        assert found["scanned_mb"] > 5, found  # the scan really read the process
        assert found["proc_environ"] in (False, "denied"), found
        assert (found["environ"], found["memory_hits"]) == (False, 0), found
        shell = sb.run("env", "bash", limits=SMALL)
        assert shell.status is RunStatus.OK, shell
        assert secret not in shell.stdout


# --- 14. IPC objects die with their run ----------------------------------------------------------

IPC_PLANT = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT = 0o1000
size = SHM_MB << 20
shm = libc.shmget(0x7A6E, ctypes.c_size_t(size), IPC_CREAT | 0o666)
addr = libc.shmat(shm, None, 0)
ctypes.memset(addr, 1, size)  # charged to this run's memory
libc.shmdt(ctypes.c_void_p(addr))
msg = libc.msgget(0x7A6F, IPC_CREAT | 0o666)
sem = libc.semget(0x7A70, 1, IPC_CREAT | 0o666)
mq = libc.mq_open(b"/tg-leak", os.O_CREAT | os.O_RDWR, 0o666, None)
print(json.dumps({"shm": shm, "msg": msg, "sem": sem, "mq": mq}))
"""

IPC_LOOK = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def errname(result):
    return "exists" if result >= 0 else errno.errorcode[ctypes.get_errno()]
seen = {
    "shm": errname(libc.shmget(0x7A6E, ctypes.c_size_t(0), 0)),
    "msg": errname(libc.msgget(0x7A6F, 0)),
    "sem": errname(libc.semget(0x7A70, 0, 0)),
    "mq": errname(libc.mq_open(b"/tg-leak", os.O_RDONLY)),
}
for name in ("shm", "msg", "sem"):
    with open(f"/proc/sysvipc/{name}") as f:
        seen[f"listed_{name}"] = len(f.readlines()) - 1
block = bytearray(ALLOC_MB << 20)  # an honest allocation within this run's limit
seen["allocated_mb"] = len(block) >> 20
print(json.dumps(seen))
"""


def test_ipc_objects_of_one_run_are_gone_for_the_next(solo: Sandbox) -> None:
    """Same worker, consecutive runs: SysV shared memory, message queues and semaphores and
    POSIX message queues made by the first are neither visible to the second nor charged to
    it (before the fix, leftover shared memory made an honest allocation fail)."""
    before = solo.state()
    planted = report(solo.run("SHM_MB = 200\n" + IPC_PLANT, limits=dict(SMALL, memory_mb=320)))
    assert all(value >= 0 for value in planted.values()), planted
    seen = report(solo.run("ALLOC_MB = 200\n" + IPC_LOOK, limits=dict(SMALL, memory_mb=320)))
    assert seen == {
        "shm": "ENOENT",
        "msg": "ENOENT",
        "sem": "ENOENT",
        "mq": "ENOENT",
        "listed_shm": 0,
        "listed_msg": 0,
        "listed_sem": 0,
        "allocated_mb": 200,
    }
    assert {w.pid for w in solo.pool._workers} == before.worker_pids, "not the same worker"
    solo.assert_unharmed(before)


# --- 15. the compile cache ----------------------------------------------------------------------

HEADER_MAIN = '#include <cstdio>\n#include "inc/value.h"\nint main() { printf("%d\\n", VALUE); }\n'


def test_the_compile_cache_covers_the_files_the_compiler_reads(sandbox: Sandbox) -> None:
    """Same ``main.cpp``, a different header in ``files``: a different program. (The cache
    keyed on the source alone ran the first request's binary for the second.)"""
    before = sandbox.state()
    tag = uuid.uuid4().hex  # a source never compiled before, so the first run compiles
    code = f"// {tag}\n" + HEADER_MAIN
    outputs = []
    for value in (1, 2, 1):
        header = base64.b64encode(f"#define VALUE {value}\n".encode()).decode()
        result = sandbox.run(code, "cpp", limits=SMALL, files={"inc/value.h": header})
        assert result.status is RunStatus.OK, result
        outputs.append(result.stdout)
    assert outputs == ["1\n", "2\n", "1\n"]
    sandbox.assert_unharmed(before)


def test_compile_timeout_s_bounds_the_compile_step(sandbox: Sandbox) -> None:
    before = sandbox.state()
    code = f"// {uuid.uuid4().hex}\n" + "#include <iostream>\nint main() { std::cout << 1; }\n"
    result = sandbox.run(code, "cpp", limits=SMALL, compile_timeout_s=0.001)
    assert result.status is RunStatus.TIMEOUT, result
    assert result.error == "compile timeout"
    ok = sandbox.run(code, "cpp", limits=SMALL, compile_timeout_s=60)
    assert (ok.status, ok.stdout) == (RunStatus.OK, "1"), ok
    sandbox.assert_unharmed(before)


# --- 16. who killed the program ------------------------------------------------------------------


def test_a_kill_from_outside_is_the_sandboxes_error_not_the_programs(sandbox: Sandbox) -> None:
    """An operator (or the host's OOM killer) SIGKILLs the program's process: that is the
    infrastructure's failure, to be retried, not a crash to be scored 0."""
    pool = sandbox.pool
    before = sandbox.state()

    async def scenario() -> RunResult:
        task = asyncio.create_task(pool.run(code=VICTIM, limits={"wall_s": 60}))
        victims = await eventually(lambda: named(pool, "tg-victim"), 10.0)
        assert victims, "the victim program never started"
        os.kill(victims[0].pid, signal.SIGKILL)
        return await task

    try:
        result = sandbox.wait(scenario())
    finally:
        kill_all(named(pool, "tg-victim"))
    assert result.status is RunStatus.SANDBOX_ERROR, result
    assert result.error is not None
    assert "outside the sandbox" in result.error
    sandbox.assert_unharmed(before)


@pytest.mark.parametrize(
    ("code", "status", "stdout"),
    [
        # The kernel drops a SIGKILL sent to a pid namespace's init from inside: it runs on.
        (
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nprint('alive')\n",
            "ok",
            "alive",
        ),
        ("import os, signal\nos.kill(0, signal.SIGKILL)\nprint('alive')\n", "ok", "alive"),
        # A real crash is the program's own.
        ("import ctypes\nctypes.string_at(0)\n", "runtime_error", ""),
    ],
    ids=["self_kill", "group_kill", "segfault"],
)
def test_a_program_cannot_pass_its_own_death_off_as_the_sandboxes(
    sandbox: Sandbox, code: str, status: str, stdout: str
) -> None:
    before = sandbox.state()
    result = sandbox.run(code, limits=SMALL)
    assert (result.status.value, result.stdout.strip()) == (status, stdout), result
    sandbox.assert_unharmed(before)


# --- 19. what a run reports -----------------------------------------------------------------------


def test_an_ordinary_python_run_reports_its_usage_and_output_whole(solo: Sandbox) -> None:
    """All the output, the exit status, CPU time and peak memory of a Python run; and the wall
    limit counts from the program's start (a short limit is the program's timeout, not a
    failure of the set-up before it: see the compile-timeout test)."""
    code = (
        "import sys\nx = bytearray(64 * 1024 * 1024)\nfor i in range(0, len(x), 4096):\n"
        "    x[i] = 1\nsum(range(3_000_000))\nsys.stdout.write('o' * 100_000)\n"
        "sys.stderr.write('e' * 5_000)\nsys.exit(3)"
    )
    res = solo.run(code, limits=dict(SMALL, output_bytes=1 << 20))
    assert res.exit_code == 3
    assert len(res.stdout) == 100_000
    assert len(res.stderr) == 5_000
    assert res.max_rss_mb >= 64
    assert res.cpu_s > 0
