"""Rootless mode, for real: a pool and a server run as an unprivileged uid, under attack.

Why: many users cannot be root (Kubernetes pods, HPC nodes) while CI runs as root, so rootless
mode was coded but never run; when first run here, every worker died at its second execution.
This module takes a uid nobody uses, starts a real :class:`SandboxPool`
(``rootless_pool_driver.py``) and a real ``tangram-sandbox serve`` under it with ``setpriv``,
and runs the escape and security cases of ``test_security.py`` against both. The test itself
stays root, to see what a sandbox cannot hide from the host: the process table, every
process's memory, the files.

Why ``setpriv`` and a uid without a passwd entry rather than ``useradd``: the kernel knows only
uids, so nothing on the host changes (no line in /etc/passwd to forget), and the uid is leased
like a slot uid (a lock file in root's slot lock dir) so that two sessions never share it.

What rootless mode gives up, and so what these tests expect (README, "Rootless"): no slot uids
(every program runs as the pool's uid, kept apart by namespaces and seccomp, the user's own
directories hidden) and no cgroups (memory is limited per process).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import httpx
import pytest
from host_processes import Proc, processes

from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import RunResult, RunStatus
from tangram_sandbox.program import PROGRAM_ENV

T = TypeVar("T")


def _why_skip() -> str | None:
    if sys.platform != "linux":
        return "rootless mode is built on Linux user namespaces"
    if os.geteuid() != 0:
        return "needs root: to run the pool as another, unprivileged uid and watch it from outside"
    if shutil.which("setpriv") is None:
        return "needs util-linux's setpriv, to drop to the unprivileged uid"
    return None


_SKIP = _why_skip()
if _SKIP is not None:
    pytest.skip(_SKIP, allow_module_level=True)

#: Candidate uids for the unprivileged user: none has a passwd entry on a normal host, and the
#: range is clear of the slot uids that pools (200000+) and test_security.py (263000+) lease.
_UIDS = range(262_500, 262_564)
#: Layers without which the attacks below would simply succeed (test_security.py's, with the
#: user namespace instead of slot uids).
_NEEDED = ("user_ns", "pid_ns", "mount_ns", "private_tmp", "seccomp")
_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rootless_pool_driver.py")
_SECRET_ENV = "TANGRAM_ROOTLESS_SECRET"
#: How the child interpreter finds the venv's packages without the venv's interpreter (which
#: may live where the unprivileged uid cannot read, as pyenv's under /root does): it adds the
#: venv's site dirs, .pth files included, then runs a script (``.py``) or a module.
_BOOT = (
    "import runpy, site, sys\n"
    "for d in sys.argv[1].split(':'):\n"
    "    site.addsitedir(d)\n"
    "target = sys.argv[2]\n"
    "sys.argv = [target, *sys.argv[3:]]\n"
    "if target.endswith('.py'):\n"
    "    runpy.run_path(target, run_name='__main__')\n"
    "else:\n"
    "    runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
)

#: Small limits, so that each attack ends in about a second.
SMALL: dict[str, Any] = {"wall_s": 2, "memory_mb": 256, "processes": 32, "output_bytes": 65536}
SANITY = "print(6 * 7)"


# --- the host's view ------------------------------------------------------------------------------


def live(uid: int) -> list[Proc]:
    """The uid's processes that still run (zombies wait for the host's init, and run nothing)."""
    return [p for p in processes().values() if p.uid == uid and p.state != "Z"]


def named(uid: int, name: str) -> list[Proc]:
    return [p for p in live(uid) if p.name == name]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def eventually(predicate: Callable[[], T], timeout: float) -> T:
    """The first truthy value of ``predicate``, polled; its last value when time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def memory_holds(pid: int, needles: list[bytes]) -> set[bytes]:
    """Which ``needles`` occur anywhere in the readable memory of ``pid`` (read as root, from
    outside: a program's own search would find its needle in its own memory)."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or "[vsyscall]" in line or "[vvar" in line:
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            found.update(n for n in needles if n in data)
    return found


# --- the unprivileged user ------------------------------------------------------------------------


@dataclass
class User:
    """The unprivileged uid, its home, and how to run Python as it."""

    uid: int
    home: str
    python: str
    site_dirs: str
    secret: str
    token: str
    token_file: str
    caps: dict[str, Any] = field(default_factory=dict)
    #: The pool driver script, as this uid reaches it (see :func:`_view_for`).
    driver: str = _DRIVER
    #: The processes (pool driver, server) whose trees may hold this uid's processes.
    roots: set[int] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """A plain user's environment, plus a secret that no program may ever see."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.home,
            "LANG": "C.UTF-8",
            _SECRET_ENV: self.secret,
        }

    def argv(self, target: str, *args: str) -> list[str]:
        """Run ``target`` (a script or a module) as this uid, with no group and no capability.

        Why through ``env``: setpriv still holds root's capabilities while it looks up the
        program it runs, so it can start an interpreter the uid itself could not (one under
        /root); ``env``, started as the uid, looks it up with the uid's rights."""
        drop = [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--inh-caps=-all"]
        run = [self.python, "-I", "-c", _BOOT, self.site_dirs, target, *args]
        return ["setpriv", *drop, "env", *run]

    def may(self, test: str, path: str) -> bool:
        """Whether this uid passes ``test -r`` (``-x``...) on ``path``, asked as the uid."""
        drop = [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        done = subprocess.run(["setpriv", *drop, "env", "test", test, path], check=False)
        return done.returncode == 0

    def run(self, target: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(target, *args),
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    @property
    def lock_dir(self) -> str:
        return f"/tmp/tangram-sandbox-slots-{self.uid}"


def owned(uid: int) -> set[str]:
    """What ``uid`` owns directly in the host's shared temporary dirs."""
    found = set()
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError), os.scandir(shared) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        found.add(entry.path)
    return found


def _lease_uid() -> tuple[int, int]:
    """A uid with no passwd entry, no process and no file in the shared temporary dirs,
    leased in root's slot lock dir (so that a pool or another session of this test never
    takes it), and the lock's descriptor."""
    lock_dir = PoolConfig(min_workers=0, max_workers=1).lock_dir
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    busy = {p.uid for p in processes().values()}
    for uid in _UIDS:
        with contextlib.suppress(KeyError):
            pwd.getpwuid(uid)
            continue
        if uid in busy or owned(uid):
            continue
        fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    pytest.fail(f"no free uid in [{_UIDS.start}, {_UIDS.stop}) for the unprivileged user")


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(_DRIVER))))


@contextlib.contextmanager
def _view_for(who: User) -> Iterator[None]:
    """Make the checkout and its venv reachable by ``who`` when they are not (a clone under
    root's mode-700 home, say), without changing any permission on the host: a read-only bind
    mount of the checkout under /var/tmp, whose own directory is open. The workspace packages
    are then found through their ``src`` folders in the view (their editable-install hooks
    name the original paths, which the uid cannot reach), and the driver runs from it."""
    if all(who.may("-r", p) for p in [_DRIVER, *site.getsitepackages()]):
        yield
        return
    stage = tempfile.mkdtemp(prefix="tangram-rootless-view-", dir="/var/tmp")
    os.chmod(stage, 0o755)
    view = os.path.join(stage, "repo")
    os.mkdir(view)
    mounted = False
    try:
        subprocess.run(["mount", "--bind", _REPO, view], check=True, capture_output=True)
        mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True, capture_output=True)

        def moved(path: str) -> str:
            inside = os.path.relpath(path, _REPO)
            return path if inside.startswith("..") else os.path.join(view, inside)

        packages = os.path.join(view, "packages")
        sources = sorted(
            os.path.join(packages, name, "src")
            for name in os.listdir(packages)
            if os.path.isdir(os.path.join(packages, name, "src"))
        )
        who.site_dirs = ":".join([*sources, *(moved(d) for d in site.getsitepackages())])
        who.driver = moved(_DRIVER)
        yield
    finally:
        if mounted:
            subprocess.run(["umount", "-l", view], check=False, capture_output=True)
        shutil.rmtree(stage, ignore_errors=True)


def _interpreters() -> list[str]:
    """Interpreters that may run the venv's packages: this one (when the uid can read it),
    else the system's of the same minor version (compiled extensions need the same ABI)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable)]
    found += [f"/usr/bin/{version}", f"/usr/local/bin/{version}", shutil.which(version) or ""]
    return list(dict.fromkeys(p for p in found if p and os.path.exists(p)))


def _kill_uid(uid: int) -> None:
    """Every process of the leased uid is ours: end them all, by pid."""
    for proc in live(uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """The unprivileged uid, with a home of its own (mode 700, its token file inside), able to
    import the package; skips when this host cannot run a rootless sandbox at all."""
    uid, lock_fd = _lease_uid()
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    home = tempfile.mkdtemp(prefix=f"tangram-rootless-{uid}-", dir=base)
    os.chown(home, uid, uid)
    token = secrets.token_urlsafe(32)
    token_file = os.path.join(home, ".tangram_token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, token.encode())
    os.fchown(fd, uid, uid)
    os.close(fd)
    dirs = ":".join(site.getsitepackages())
    who = User(uid, home, "", dirs, uuid.uuid4().hex, token, token_file)
    views = contextlib.ExitStack()
    try:
        views.enter_context(_view_for(who))
        closed = [p for p in [who.driver, *who.site_dirs.split(":")] if not who.may("-r", p)]
        if closed:
            pytest.skip(f"uid {uid} cannot read {closed}: the checkout is closed to other users")
        tried = []
        for python in _interpreters():
            if not who.may("-x", python):
                continue
            who.python = python
            done = who.run("tangram_sandbox.cli", "capabilities", "--json")
            if done.returncode == 0:
                who.caps = json.loads(done.stdout)
                break
            tried.append(f"{python}: {done.stderr.strip()[-800:] or done.returncode}")
        else:
            if not tried:
                pytest.skip(f"no Python {sys.version_info[:2]} that uid {uid} may run")
            pytest.fail(f"uid {uid} can read the checkout, but cannot import it: {tried}")
        layers = {la["name"]: la for la in who.caps["layers"]}
        missing = [f"{n} ({layers[n]['detail']})" for n in _NEEDED if not layers[n]["available"]]
        if missing:
            pytest.skip(f"this host does not give an unprivileged uid: {', '.join(missing)}")
        yield who
    finally:
        _kill_uid(uid)
        views.close()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(f"/tmp/tangram-sandbox-slots-{uid}", ignore_errors=True)
        os.close(lock_fd)


def _user_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:  # it exited while we looked
        return ""


def leftovers(who: User) -> list[str]:
    """What the uid left behind: a process outside the pool's and server's trees, a process of
    a finished program, more than one spare program per worker, or a file of the uid's own in
    the host's shared temporary dirs.

    A program is told from the sandbox's own processes by its user namespace, which each
    program makes for itself: below the worker (the process the pool started), a process
    whose user namespace differs from its parent's is a program, and so is everything under
    it. Only an idle spare, forked ahead of its job, may be left: one per parent."""
    procs = processes()
    problems = []
    spares: Counter[int] = Counter()
    for proc in live(who.uid):
        chain = [proc]
        while chain[-1].pid not in who.roots and len(chain) < 16:
            parent = procs.get(chain[-1].ppid)
            if parent is None:
                break
            chain.append(parent)
        if chain[-1].pid not in who.roots:
            problems.append(f"stray process {proc}")
            continue
        below_worker = chain[:-2]  # from proc up to the worker, the worker left out
        starts = [i for i, p in enumerate(below_worker) if _user_ns(p.pid) != _user_ns(p.ppid)]
        if starts == [0]:
            spares[proc.ppid] += 1
        elif starts:
            problems.append(f"{proc} is a program's process: it outlived its run")
    problems += [f"process {p} keeps {n} spare programs" for p, n in spares.items() if n > 1]
    expected = {who.home, who.lock_dir}
    problems += [f"host file {path} owned by uid {who.uid}" for path in owned(who.uid) - expected]
    return problems


# --- the pool and the server, as that user --------------------------------------------------------


class Target:
    """A pool or a server running as the user: submit programs, see its workers from outside."""

    name: str
    workers_wanted: int

    def __init__(self, who: User, proc: subprocess.Popen[str], errlog: IO[str]) -> None:
        self.user = who
        self.proc = proc
        self.pid = proc.pid
        self.errlog = errlog
        who.roots.add(self.pid)

    def submit(self, code: str, language: str = "python", **fields: Any) -> Future[RunResult]:
        raise NotImplementedError

    def run(self, code: str, language: str = "python", **fields: Any) -> RunResult:
        return self.submit(code, language, **fields).result(timeout=60)

    def stderr(self) -> str:
        self.errlog.seek(0)
        return self.errlog.read()[-3000:]

    def workers(self) -> frozenset[int]:
        """The processes this target started (its zygote workers), as the host sees them."""
        return frozenset(p.pid for p in live(self.user.uid) if p.ppid == self.pid)

    def assert_unharmed(self, before: frozenset[int], replaced: int = 0) -> None:
        """Still answers, with ``replaced`` workers replaced, and nothing left behind."""
        sane = self.run(SANITY)
        assert (sane.status, sane.stdout) == (RunStatus.OK, "42\n"), sane
        clean = eventually(lambda: not leftovers(self.user), 3.0)
        assert clean, leftovers(self.user)
        now = eventually(lambda: len(self.workers()) == self.workers_wanted, 5.0)
        assert now, f"{len(self.workers())} workers, {self.workers_wanted} wanted"
        assert len(self.workers() - before) == replaced, (before, self.workers())
        assert self.proc.poll() is None, self.stderr()

    def kill(self) -> None:
        """SIGKILL the pool's (or the server's) own process, as the OOM killer would."""
        self.proc.kill()
        self.proc.wait()
        self.user.roots.discard(self.pid)

    def close(self) -> None:
        raise NotImplementedError


class _Run(Future[RunResult]):
    """A run in the pool driver: its result, and its request's id (to cancel it by)."""

    def __init__(self, ident: int) -> None:
        super().__init__()
        self.ident = ident


class PoolTarget(Target):
    """``rootless_pool_driver.py`` as the user: a :class:`SandboxPool` in a child process."""

    name = "pool"

    def __init__(self, who: User, workers: int) -> None:
        errlog = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        settings = json.dumps({"min_workers": workers, "max_workers": workers})
        proc = subprocess.Popen(
            who.argv(who.driver, settings),
            env=who.env,
            cwd=who.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            bufsize=1,
        )
        super().__init__(who, proc, errlog)
        self.workers_wanted = workers
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.ready: Future[dict[str, Any]] = Future()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.ready.result(timeout=60)
        except Exception:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self.ready.set_result(msg)
                continue
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
        gone = RuntimeError(f"the pool process ended: {self.stderr()}")
        with self._lock:
            waiting, self._pending = list(self._pending.values()), {}
        for fut in [self.ready, *waiting]:
            if not fut.done():
                fut.set_exception(gone)

    def call(self, op: str, **fields: Any) -> tuple[int, Future[dict[str, Any]]]:
        ident = next(self._ids)
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            self._pending[ident] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": ident, "op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return ident, fut

    def submit(self, code: str, language: str = "python", **fields: Any) -> _Run:
        request = {"code": code, "language": language, **fields}
        ident, answer = self.call("run", request=request)
        result = _Run(ident)

        def done(fut: Future[dict[str, Any]]) -> None:
            try:
                msg = fut.result()
            except Exception as exc:
                result.set_exception(exc)
                return
            if "result" in msg:
                result.set_result(RunResult.model_validate(msg["result"]))
            else:
                result.set_exception(RuntimeError(f"run {ident}: {msg}"))

        answer.add_done_callback(done)
        return result

    def cancel(self, run: _Run) -> None:
        """Cancel a run inside the pool, as a client that went away."""
        self.call("cancel", target=run.ident)[1].result(timeout=10)

    def state(self) -> dict[str, Any]:
        return self.call("state")[1].result(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("close", drain=False)[1].result(timeout=30)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.user.roots.discard(self.pid)
        self.errlog.close()


class ServerTarget(Target):
    """``tangram-sandbox serve`` as the user, on loopback, with the user's token file."""

    name = "server"

    def __init__(self, who: User, workers: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        errlog = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        argv = who.argv(
            "tangram_sandbox.cli",
            "serve",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--token-file",
            who.token_file,
        )
        proc = subprocess.Popen(
            argv,
            env=who.env,
            cwd=who.home,
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
            text=True,
        )
        super().__init__(who, proc, errlog)
        self.workers_wanted = workers
        self.auth = {"Authorization": f"Bearer {who.token}"}
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers=self.auth, timeout=60
        )
        self._threads = ThreadPoolExecutor(8)
        try:
            assert eventually(self._healthy, 60.0), f"the server never got healthy: {self.stderr()}"
        except BaseException:
            self.close()
            raise

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited: {self.stderr()}")
        with contextlib.suppress(httpx.HTTPError):
            return self.http.get("/healthz").status_code == 200
        return False

    def submit(self, code: str, language: str = "python", **fields: Any) -> Future[RunResult]:
        body = {"code": code, "language": language, **fields}

        def post() -> RunResult:
            response = self.http.post("/run", json=body)
            response.raise_for_status()
            return RunResult.model_validate(response.json())

        return self._threads.submit(post)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.user.roots.discard(self.pid)
        self.errlog.close()


@pytest.fixture(scope="module")
def pool(user: User) -> Iterator[PoolTarget]:
    target = PoolTarget(user, workers=2)
    try:
        yield target
    finally:
        target.close()


@pytest.fixture(scope="module")
def server(user: User) -> Iterator[ServerTarget]:
    target = ServerTarget(user, workers=2)
    try:
        yield target
    finally:
        target.close()


@pytest.fixture(params=["pool", "server"])
def target(request: pytest.FixtureRequest) -> Target:
    """Each case runs against the pool and against the server (both 2 workers, module-wide)."""
    found: Target = request.getfixturevalue(request.param)
    return found


def report(result: RunResult) -> Any:
    """The JSON a probe program printed."""
    assert result.status is RunStatus.OK, result
    return json.loads(result.stdout)


# --- what the host allows an unprivileged uid ----------------------------------------------------


def test_capabilities_say_what_holds_and_what_degrades(user: User) -> None:
    """``tangram-sandbox capabilities`` run as the user: every namespace, seccomp and the
    read-only root hold; slot uids need root; and the table says what that means."""
    layers = {la["name"]: la for la in user.caps["layers"]}
    assert user.caps["euid"] == user.uid
    holds = ["user_ns", "pid_ns", "net_ns", "mount_ns", "ipc_ns", "uts_ns", "seccomp"]
    holds += ["readonly_root", "private_tmp"]
    assert {n: layers[n]["available"] for n in holds} == dict.fromkeys(holds, True), layers
    assert not layers["slot_uid"]["available"]
    assert "needs root" in layers["slot_uid"]["detail"]
    table = user.run("tangram_sandbox.cli", "capabilities")
    assert table.returncode == 0, table.stderr
    assert f"rootless (euid {user.uid}); these layers hold: " in table.stdout
    assert "slot_uid degrades: every program runs as uid" in table.stdout
    for cgroup in ("cgroup_memory", "cgroup_pids"):
        assert (f"{cgroup} degrades" in table.stdout) != layers[cgroup]["available"]
    strict = user.run("tangram_sandbox.cli", "capabilities", "--strict")
    assert strict.returncode == 1, "slot_uid is missing: --strict must say so"


def test_the_pool_keeps_its_state_in_the_users_own_dirs(user: User, pool: PoolTarget) -> None:
    """Root's slot lock dir is closed to the user: the default must be a dir of its own."""
    state = pool.state()
    assert state["lock_dir"] == user.lock_dir
    assert state["cache_dir"] == os.path.join(user.home, ".cache", "tangram-sandbox")
    info = os.stat(user.lock_dir)
    assert (info.st_uid, info.st_mode & 0o777) == (user.uid, 0o700)
    assert len(state["leases"]) == state["size"] == 2


# --- who the program is -----------------------------------------------------------------------

IDENTITY_PROBE = """
import ctypes, json, os, socket, time
ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
    "procs": sorted(p for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(), "groups": os.getgroups(),
    "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
}), flush=True)
time.sleep(1.0)
"""


def test_a_program_is_the_users_uid_alone_in_its_namespaces(user: User, target: Target) -> None:
    """Inside: not root, no capability, pid 1 of a namespace that shows nothing else. From the
    host: the user's uid, never root's (there is no slot uid to take instead)."""
    before = target.workers()
    name = f"tg-id-{target.name}"
    run = target.submit(f"NAME = {name!r}\n" + IDENTITY_PROBE, limits=SMALL)
    seen = eventually(lambda: named(user.uid, name), 5.0)
    got = report(run.result(timeout=30))
    assert got["uid"] != 0, got
    assert got["gid"] != 0, got
    assert (got["pid"], got["procs"]) == (1, ["1"]), got
    assert (got["no_new_privs"], got["seccomp"]) == ("1", "2"), got
    assert got["hostname"] != socket.gethostname()
    assert seen, "the probe never showed on the host"
    assert {p.uid for p in seen} == {user.uid}, seen
    target.assert_unharmed(before)


# --- files ------------------------------------------------------------------------------------

READ_PROBE = """
import json, os
out = {}
for path in json.loads(PATHS):
    try:
        if os.path.isdir(path):
            out[path] = sorted(os.listdir(path))
        else:
            with open(path, "rb") as f:
                out[path] = f.read().decode(errors="replace")
    except OSError as exc:
        out[path] = exc.__class__.__name__
print(json.dumps(out))
"""


def test_root_only_files_and_the_users_secrets_stay_closed(user: User, target: Target) -> None:
    """Root's files are closed to the user's uid, as to any; the user's own (its home with the
    server's token file, the compile cache) would be open to it, so the sandbox hides them."""
    before = target.workers()
    cache = os.path.join(user.home, ".cache", "tangram-sandbox")
    paths = ["/etc/shadow", "/root", user.home, user.token_file, cache, user.lock_dir]
    got = report(target.run(f"PATHS = {json.dumps(paths)!r}\n" + READ_PROBE, limits=SMALL))
    assert got["/etc/shadow"] == "PermissionError", got
    assert got["/root"] == "PermissionError", got
    for path in (user.home, user.token_file, cache):
        assert got[path] in ("PermissionError", "FileNotFoundError"), (path, got[path])
    assert got[user.lock_dir] == "FileNotFoundError", got  # /tmp is the program's own
    assert user.token not in json.dumps(got)
    target.assert_unharmed(before)


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


def test_writes_outside_the_working_dir_fail_and_never_reach_the_host(
    user: User, target: Target
) -> None:
    """The user may write its home, its cache and the checkout's parents' temp dirs; its
    programs may write only their own /tmp, /tmp/work and /dev/shm."""
    before = target.workers()
    tag = f"tangram-escape-{uuid.uuid4().hex[:12]}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = os.path.join(user.home, ".cache", "tangram-sandbox")
    dirs = ["/", "/etc", "/usr", "/root", "/var/tmp", repo, user.home, cache]
    outside = [os.path.join(d, tag) for d in dirs] + ["/etc/passwd", user.token_file]
    inside = [f"/tmp/work/{tag}", f"/tmp/{tag}", f"/dev/shm/{tag}"]
    with open(user.token_file) as f:
        token = f.read()
    code = f"PATHS = {json.dumps(outside + inside)!r}\n" + WRITE_PROBE
    result = target.run(code, limits=SMALL, fetch_files=[tag])
    got = report(result)
    assert all(got[path] != "written" for path in outside), got
    assert all(got[path] == "written" for path in inside), got
    assert base64.b64decode(result.files[tag]) == b"escaped"
    for path in outside[:-2] + inside:
        assert not os.path.exists(path), f"{path} appeared on the host"
    with open(user.token_file) as f:
        assert f.read() == token
    target.assert_unharmed(before)


def test_the_compile_cache_cannot_be_poisoned(user: User, target: Target) -> None:
    """A C++ binary cached by one request runs again for the next with the same source; the
    cache is the user's, and so would be open to the user's programs, were it not hidden."""
    before = target.workers()
    source = f'#include <cstdio>\nint main() {{ std::puts("{uuid.uuid4().hex}"); }}\n'
    first = target.run(source, "cpp", limits=SMALL)
    assert first.status is RunStatus.OK, first
    cache = os.path.join(user.home, ".cache", "tangram-sandbox")
    attack = (
        "import json, os\nout = {}\n"
        f"for name in os.listdir({cache!r}):\n"
        f"    path = os.path.join({cache!r}, name)\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            f.write(b'#!/bin/sh\\necho poisoned\\n')\n"
        "        out[name] = 'written'\n"
        "    except OSError as exc:\n"
        "        out[name] = exc.__class__.__name__\n"
        "print(json.dumps(out))\n"
    )
    poison = target.run(attack, limits=SMALL)
    assert poison.status is RunStatus.RUNTIME_ERROR, poison  # it cannot even list the cache
    assert "PermissionError" in poison.stderr or "FileNotFoundError" in poison.stderr, poison
    again = target.run(source, "cpp", limits=SMALL)
    assert (again.status, again.stdout) == (RunStatus.OK, first.stdout), again
    target.assert_unharmed(before)


# --- fetching files -------------------------------------------------------------------------------

SWAP_WORKDIR = """
import os
os.chdir("/")
os.rename("/tmp/work", "/tmp/old")
os.symlink(TARGET, "/tmp/work")
print("swapped")
"""


@pytest.mark.parametrize(
    ("where", "fetch"),
    [("/etc", "shadow"), ("HOME", ".tangram_token")],
    ids=["etc_shadow", "token_in_home"],
)
def test_fetch_files_cannot_follow_a_swapped_working_dir(
    user: User, target: Target, where: str, fetch: str
) -> None:
    """The program replaces its working dir with a link; the zygote, which fetches files with
    the user's rights, must not follow it to /etc/shadow (closed to the user anyway) or to the
    user's token file (open to the user, and so the one that matters rootless)."""
    before = target.workers()
    link = user.home if where == "HOME" else where
    result = target.run(f"TARGET = {link!r}\n" + SWAP_WORKDIR, limits=SMALL, fetch_files=[fetch])
    assert (result.status, result.stdout) == (RunStatus.OK, "swapped\n"), result
    assert result.files == {}, sorted(result.files)
    assert result.error is not None
    assert fetch in result.error, result.error
    target.assert_unharmed(before)


# --- executions of the same worker ----------------------------------------------------------------

LOOK_AROUND = """
import json, os
seen = {}
for d in ("/tmp", "/tmp/work", "/dev/shm"):
    seen[d] = sorted(os.listdir(d))
print(json.dumps(seen))
"""


@pytest.mark.parametrize("ending", ["exits", "times_out"])
def test_an_execution_cannot_see_the_files_of_the_previous_one(target: Target, ending: str) -> None:
    """All executions share one uid rootless: only fresh mounts keep them apart. Two plant at
    once (one per worker), then two look at once: each worker has had a planter before."""
    before = target.workers()
    secret = uuid.uuid4().hex
    plant = (
        f"open('/tmp/work/secret.txt', 'w').write({secret!r})\n"
        f"open('/tmp/secret2', 'w').write({secret!r})\n"
        f"open('/dev/shm/secret3', 'w').write({secret!r})\n"
        "print('planted', flush=True)\n"
    ) + ("while True:\n    pass\n" if ending == "times_out" else "")
    limits = dict(SMALL, wall_s=1)
    planted = [target.submit(plant, limits=limits) for _ in range(2)]
    expected = RunStatus.TIMEOUT if ending == "times_out" else RunStatus.OK
    for run in planted:
        result = run.result(timeout=30)
        assert (result.status, result.stdout) == (expected, "planted\n"), result
    looks = [target.submit(LOOK_AROUND, limits=SMALL, fetch_files=["secret.txt"]) for _ in "ab"]
    for run in looks:
        result = run.result(timeout=30)
        assert report(result) == {"/tmp": ["work"], "/tmp/work": ["main.py"], "/dev/shm": []}
        assert result.files == {}
    target.assert_unharmed(before)


# --- the network and the kernel ---------------------------------------------------------------

NET_PROBE = """
import errno, json, socket
out = {}
for name, family, kind in (
    ("inet_tcp", socket.AF_INET, socket.SOCK_STREAM),
    ("inet_udp", socket.AF_INET, socket.SOCK_DGRAM),
    ("inet6", socket.AF_INET6, socket.SOCK_STREAM),
    ("netlink", socket.AF_NETLINK, socket.SOCK_RAW),
    ("packet", socket.AF_PACKET, socket.SOCK_RAW),
):
    try:
        socket.socket(family, kind).close()
        out[name] = "created"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
for name, family, address in (
    ("tcp", socket.AF_INET, ("127.0.0.1", PORT)),
    ("abstract_unix", socket.AF_UNIX, ABSTRACT),
):
    try:
        socket.socket(family, socket.SOCK_STREAM).connect(address)
        out[name] = "connected"
    except OSError as exc:
        out[name] = exc.__class__.__name__
with open("/proc/net/dev") as f:
    out["interfaces"] = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
print(json.dumps(out))
"""


def test_the_network_is_out_of_reach(target: Target) -> None:
    """Rootless the program still gets a network namespace with only a loopback, and seccomp
    refuses every socket family but AF_UNIX: the server's own port, and a host listener on
    127.0.0.1 or an abstract unix socket, see no connection."""
    before = target.workers()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with tcp, abstract:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        name = f"\0tangram-rootless-{uuid.uuid4().hex}"
        abstract.bind(name)
        abstract.listen()
        abstract.setblocking(False)
        code = f"PORT = {tcp.getsockname()[1]}\nABSTRACT = {name!r}\n" + NET_PROBE
        got = report(target.run(code, limits=SMALL))
        for listener in (tcp, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()
    for family in ("inet_tcp", "inet_udp", "inet6", "netlink", "packet"):
        assert got[family] == "EPERM", got
    assert got["tcp"] == "PermissionError", got
    assert got["abstract_unix"] != "connected", got
    assert got["interfaces"] == ["lo"], got
    target.assert_unharmed(before)


SYSCALL_PROBE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    ctypes.set_errno(0)
    ret = getattr(libc, name)(*args)
    return [ret, errno.errorcode.get(ctypes.get_errno(), "0")]
net = os.open("/proc/self/ns/net", os.O_RDONLY)
print(json.dumps({
    "ptrace_traceme": call("ptrace", 0, 0, None, None),
    "mount_tmpfs": call("mount", b"tmpfs", b"/tmp/work", b"tmpfs", 0, None),
    "remount_root_rw": call("mount", None, b"/", None, 32, None),
    "umount_proc": call("umount2", b"/proc", 2),
    "unshare_user": call("unshare", 0x10000000),
    "unshare_mount": call("unshare", 0x00020000),
    "setns_net": call("setns", net, 0),
    "chroot": call("chroot", b"/tmp"),
    "setuid_0": call("setuid", 0),
}))
"""


def test_ptrace_mount_and_namespace_calls_are_denied(target: Target) -> None:
    """The program is uid 0 of nothing: in a user namespace of its own, without a uid map or
    any capability, under seccomp. A fresh user namespace (the rootless way back to
    capabilities) is refused too."""
    before = target.workers()
    got = report(target.run(SYSCALL_PROBE, limits=SMALL))
    assert got.pop("setuid_0")[0] == -1, "uid 0 is not even mapped in its namespace"
    assert got == {name: [-1, "EPERM"] for name in got}, got
    target.assert_unharmed(before)


# --- resources --------------------------------------------------------------------------------

FORK_FOREVER = (
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)


@pytest.mark.parametrize(
    ("language", "code"),
    [("python", FORK_FOREVER), ("bash", ":(){ :|:& };:\nsleep 30")],
    ids=["python", "bash"],
)
def test_a_fork_bomb_times_out_and_leaves_no_process(
    target: Target, language: str, code: str
) -> None:
    before = target.workers()
    start = time.monotonic()
    result = target.run(code, language, limits=dict(SMALL, wall_s=1))
    assert result.status is RunStatus.TIMEOUT, result
    assert time.monotonic() - start < 3.0
    target.assert_unharmed(before)


def test_a_fork_bomb_does_not_starve_the_other_worker(target: Target) -> None:
    """Without slot uids or a pids cgroup, RLIMIT_NPROC is what bounds a bomb: the kernel
    counts it in each execution's own user namespace, so the neighbour can still fork."""
    before = target.workers()
    neighbour = (
        "import os\n"
        "pids = [os.fork() for _ in range(4)]\n"
        "if 0 in pids:\n    os._exit(0)\n"
        "for pid in pids:\n    os.waitpid(pid, 0)\n"
        "print('forked fine')\n"
    )
    bomb = target.submit(FORK_FOREVER, limits=SMALL)
    time.sleep(0.5)  # the bomb has used up its processes by now
    ok = target.run(neighbour, limits=SMALL)
    assert (ok.status, ok.stdout) == (RunStatus.OK, "forked fine\n"), ok
    assert bomb.result(timeout=30).status is RunStatus.TIMEOUT
    target.assert_unharmed(before)


def test_a_memory_bomb_is_memory_limit(target: Target) -> None:
    """No memory cgroup rootless: RLIMIT_AS stops it, and Python's MemoryError names it."""
    before = target.workers()
    result = target.run("x = bytearray(1 << 30)\n", limits=dict(SMALL, wall_s=5))
    assert result.status is RunStatus.MEMORY_LIMIT, result
    assert result.wall_s < 4.0
    target.assert_unharmed(before)


SPLIT_MEMORY = """
import os, time
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = bytearray(100 << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not reserved
        time.sleep(0.5)
        os._exit(0)
    kids.append(pid)
print([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids])
"""


def test_memory_is_limited_per_process_not_per_execution(user: User, pool: PoolTarget) -> None:
    """What the missing memory cgroup costs, measured: three processes of 100 MB each under a
    160 MB limit all run (RLIMIT_AS is per process); a memory cgroup would stop the total."""
    before = pool.workers()
    result = pool.run(SPLIT_MEMORY, limits=dict(SMALL, memory_mb=160, wall_s=10))
    if {la["name"]: la["available"] for la in user.caps["layers"]}["cgroup_memory"]:
        assert result.status is RunStatus.MEMORY_LIMIT, result
    else:
        assert (result.status, result.stdout) == (RunStatus.OK, "[0, 0, 0]\n"), result
    pool.assert_unharmed(before)


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass\n",
        "import signal, time\n"
        "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(sig, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(0.05)\n",
    ],
    ids=["busy", "ignoring_signals"],
)
def test_an_infinite_loop_times_out_at_the_wall_limit(target: Target, code: str) -> None:
    before = target.workers()
    result = target.run(code, limits=dict(SMALL, wall_s=1))
    assert result.status is RunStatus.TIMEOUT, result
    assert 0.9 <= result.wall_s <= 1.5, result.wall_s
    target.assert_unharmed(before)


# --- the server's secrets -------------------------------------------------------------------------

SECRETS_PROBE = """
import ctypes, json, os, time
ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)
with open("/proc/self/environ", "rb") as f:
    block = f.read()
print(json.dumps({
    "environ": sorted(os.environ),
    "block_names": sorted(v.split(b"=")[0].decode() for v in block.split(b"\\0") if v),
    "block_home": [v[5:].decode() for v in block.split(b"\\0") if v.startswith(b"HOME=")],
}), flush=True)
time.sleep(1.5)
"""


def test_the_servers_secrets_reach_no_program(user: User, target: Target) -> None:
    """The pool (or server) holds a secret in its environment, and the server its token: none
    may be in a program's environment, its environment block, or anywhere in its memory or
    its zygote's (every program is a fork of the zygote). Memory is read from outside."""
    before = target.workers()
    name = f"tg-sec-{target.name}"
    run = target.submit(f"NAME = {name!r}\n" + SECRETS_PROBE, limits=dict(SMALL, wall_s=5))
    programs = eventually(lambda: named(user.uid, name), 5.0)
    assert programs, "the probe never started"
    procs = processes()
    zygote = procs[programs[0].ppid]
    needles = [user.secret.encode(), user.token.encode()]
    leaked = {pid: memory_holds(pid, needles) for pid in (programs[0].pid, zygote.pid)}
    got = report(run.result(timeout=30))
    assert leaked == {programs[0].pid: set(), zygote.pid: set()}, leaked
    assert _SECRET_ENV not in got["environ"], got
    assert _SECRET_ENV not in got["block_names"], got
    # the zygote's block is the programs' own environment, never ours (our HOME included)
    assert got["block_names"] == sorted(PROGRAM_ENV), got
    assert got["block_home"] == [PROGRAM_ENV["HOME"]], got
    target.assert_unharmed(before)


# --- killing ------------------------------------------------------------------------------------

VICTIM = (
    "import ctypes, time\n"
    "ctypes.CDLL(None).prctl(15, NAME.encode(), 0, 0, 0)\n"
    "time.sleep(30)\n"
    "print('woke up')\n"
)


def _lineage(proc: Proc, target: Target) -> list[Proc]:
    """``proc`` and its ancestors up to the worker (the process the target started), as the
    host sees them: the program, the fork server, the zygote, the worker."""
    procs = processes()
    chain = [proc]
    while chain[-1].ppid != target.pid:
        chain.append(procs[chain[-1].ppid])
    return chain


@contextlib.contextmanager
def victim(who: User, target: Target, name: str) -> Iterator[tuple[Future[RunResult], Proc]]:
    """A long run that names itself ``name``, found on the host; killed (by pid) on the way
    out, so that a failed test leaves no program to fail the next one."""
    run = target.submit(f"NAME = {name!r}\n" + VICTIM, limits={"wall_s": 60})
    try:
        found = eventually(lambda: named(who.uid, name), 10.0)
        assert found, f"the victim never started: {target.stderr()}"
        yield run, found[0]
    finally:
        for proc in named(who.uid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


def test_killing_a_worker_mid_run_is_sandbox_error_and_it_is_replaced(
    user: User, target: Target
) -> None:
    """Rootless, the worker the pool started is the parent of the zygote (pid 1 of the
    worker's pid namespace): killing it must take the zygote, its fork server and the running
    program with it."""
    before = target.workers()
    with victim(user, target, f"tg-kw-{target.name}") as (run, program):
        lineage = _lineage(program, target)
        assert len(lineage) >= 3, lineage
        assert lineage[-1].pid in before, (lineage, before)
        os.kill(lineage[-1].pid, signal.SIGKILL)
        killed = time.monotonic()
        result = run.result(timeout=30)
        assert result.status is RunStatus.SANDBOX_ERROR, result
        assert time.monotonic() - killed < 2.0, "the pool noticed the death late"
        gone = eventually(lambda: not any(alive(p.pid) for p in lineage), 3.0)
        assert gone, [p for p in lineage if alive(p.pid)]
    target.assert_unharmed(before, replaced=1)


def test_a_cancelled_run_takes_its_program_with_it(user: User, target: Target) -> None:
    """The pool's caller cancels (for the server: the client disconnects): the program dies
    with its worker, which is replaced."""
    before = target.workers()
    name = f"tg-cx-{target.name}"
    if isinstance(target, PoolTarget):
        with victim(user, target, name) as (run, program):
            assert isinstance(run, _Run)
            target.cancel(run)
            with pytest.raises(RuntimeError, match="cancelled"):
                run.result(timeout=10)
            gone = eventually(lambda: not alive(program.pid), 5.0)
    else:
        assert isinstance(target, ServerTarget)
        body = json.dumps({"code": f"NAME = {name!r}\n" + VICTIM, "limits": {"wall_s": 60}})
        head = (
            f"POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {target.auth['Authorization']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        try:
            with socket.create_connection(("127.0.0.1", target.port)) as client:
                client.sendall((head + body).encode())
                found = eventually(lambda: named(user.uid, name), 10.0)
                assert found, f"the victim never started: {target.stderr()}"
            gone = eventually(lambda: not alive(found[0].pid), 5.0)
        finally:
            for proc in named(user.uid, name):
                os.kill(proc.pid, signal.SIGKILL)
    assert gone, "the program outlived its caller"
    target.assert_unharmed(before, replaced=1)


@pytest.mark.parametrize("kind", ["pool", "server"])
def test_killing_the_pool_or_server_kills_every_program(user: User, kind: str) -> None:
    """SIGKILL the process that owns the pool (the OOM killer, an operator): its workers,
    zygotes and the running program must all die with it, not run on to their deadline."""
    scratch: Target = (PoolTarget if kind == "pool" else ServerTarget)(user, workers=1)
    try:
        with victim(user, scratch, f"tg-kp-{kind}") as (_, program):
            lineage = _lineage(program, scratch)
            scratch.kill()
            gone = eventually(lambda: not any(alive(p.pid) for p in lineage), 3.0)
            assert gone, [p for p in lineage if alive(p.pid)]
    finally:
        scratch.close()
    assert not leftovers(user), leftovers(user)
