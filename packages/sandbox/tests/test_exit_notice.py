"""P's end as the kernel reports it at ``exit_group``, before its teardown (the fast path).

The zygote answers a request once the kernel says the program called ``exit_group``, and lets
the process finish dying after the answer. These tests hold that path to what ``wait4``
would have reported (exit codes, output, CPU, memory), that only the program's own process
ends a run this way (not a child's or a thread's exit, nor closing its pipes), and that the
listener never reaches the program.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import time
from typing import Any

import pytest

from tangram_sandbox import _sys, seccomp
from tangram_sandbox.models import RunStatus
from tangram_sandbox.pool import SandboxPool


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_exit_notifier_is_well_formed(machine: str) -> None:
    prog = seccomp.build_exit_notifier(machine)
    n = len(prog) // 8
    assert len(prog) % 8 == 0
    assert n > 0
    returns = set()
    for i in range(n):
        code, jt, jf, k = struct.unpack_from("=HBBI", prog, 8 * i)
        if code & 0x07 == 0x05:
            assert i + 1 + max(jt, jf) < n
        if code == 0x06:
            returns.add(k)
    assert returns == {0x7FC00000, 0x7FFF0000}, "notify or allow, never deny"


def test_exit_notifier_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no syscall table for 'sparc'"):
        seccomp.build_exit_notifier("sparc")


@pytest.mark.skipif(not seccomp.supported(), reason="no syscall table for this machine")
def test_notice_comes_before_teardown_and_names_the_caller() -> None:
    """A real child: its exit_group is held until we let it go, with its status, and its
    own child's exit is told apart by pid."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            parent_end.close()
            _sys.set_no_new_privs()
            listener = _sys.install_listener(_sys.SeccompProgram(seccomp.build_exit_notifier()))
            socket.send_fds(child_end, [b"l"], [listener])
            os.close(listener)
            grandchild = os.fork()
            if grandchild == 0:
                os._exit(9)
            os.waitpid(grandchild, 0)
        finally:
            os._exit(7)
    child_end.close()
    _msg, fds, _flags, _addr = socket.recv_fds(parent_end, 16, 1)
    listener = fds[0]
    try:
        first = _sys.notice_recv(listener)
        assert first.pid != pid, "the grandchild's exit, told apart by its pid"
        assert first.arg0 & 0xFF == 9
        _sys.notice_continue(listener, first.id)
        second = _sys.notice_recv(listener)
        assert (second.pid, second.arg0 & 0xFF) == (pid, 7)
        time.sleep(0.05)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "held in exit_group until we answer"
        _sys.notice_continue(listener, second.id)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(listener)
        parent_end.close()


def _runs(codes: list[str], **limits: Any) -> list[Any]:
    async def go() -> list[Any]:
        async with SandboxPool(min_workers=1, max_workers=1) as pool:
            return [
                await pool.run(code=code, limits=limits) if limits else await pool.run(code=code)
                for code in codes
            ]

    return asyncio.run(go())


@pytest.mark.usefixtures("can_sandbox")
def test_exit_codes_and_output_are_what_the_program_left() -> None:
    big = 200_000  # more than a pipe holds: streamed while it runs, the rest at the end
    codes = [
        "print(1)",
        "import sys; print('x'); sys.exit(3)",
        # os._exit from another thread: not the program's main thread, so the pidfd tells
        "import os, threading\nthreading.Thread(target=lambda: os._exit(5)).start()\n"
        "import time; time.sleep(5)",
        # children that exit (and are notified) must not end the run
        "import subprocess\nfor _ in range(3): print(subprocess.run(['true']).returncode)\n"
        "import os\npid = os.fork()\nif pid == 0: os._exit(4)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))",
        f"import sys; sys.stdout.write('a' * {big}); sys.stderr.write('e'); sys.exit(2)",
        "import os; os.write(3, b'{\"bad\": ')",
    ]
    ok, exit3, thread5, children, big_out, side = _runs(codes)
    assert (ok.status, ok.exit_code, ok.stdout) == (RunStatus.OK, 0, "1\n")
    assert (exit3.status, exit3.exit_code, exit3.stdout) == (RunStatus.RUNTIME_ERROR, 3, "x\n")
    assert (thread5.exit_code, thread5.status) == (5, RunStatus.RUNTIME_ERROR)
    assert thread5.wall_s < 4.0
    assert (children.status, children.stdout) == (RunStatus.OK, "0\n0\n0\n4\n")
    assert (big_out.exit_code, len(big_out.stdout), big_out.stderr) == (2, big, "e")
    assert side.status is RunStatus.OK


@pytest.mark.usefixtures("can_sandbox")
def test_closing_its_pipes_does_not_end_a_run_early() -> None:
    """Only the kernel's word ends a run: a program that closes stdout and stderr and works
    on is still running, and its exit status is the one it exits with later."""
    code = "import os, time\nprint('early', flush=True)\nos.close(1); os.close(2)\n"
    code += "time.sleep(0.3)\nos._exit(4)"
    (result,) = _runs([code])
    assert (result.exit_code, result.stdout) == (4, "early\n")
    assert result.wall_s >= 0.3


@pytest.mark.usefixtures("can_sandbox")
def test_cpu_and_memory_are_reported_on_the_fast_path() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    fill = "x = bytearray(80 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1"
    spun, filled = _runs([spin, fill])
    assert 0.2 <= spun.cpu_s < 1.0
    assert filled.max_rss_mb >= 80


@pytest.mark.usefixtures("can_sandbox")
def test_the_program_holds_no_listener_and_no_trusted_channel() -> None:
    code = "import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    (result,) = _runs([code])
    fds = json.loads(result.stdout)
    # 0-3 are the program's own; the one more is the directory listing itself
    assert fds[:4] == [0, 1, 2, 3]
    assert len(fds) == 5, fds


@pytest.mark.usefixtures("can_sandbox")
def test_a_run_starts_only_after_the_last_one_left_the_slots_memory() -> None:
    """The last process finishes dying before the next program of the worker starts: two
    programs that each fill most of the memory limit both fit, one after the other."""
    fill = "x = bytearray(300 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('ok')"
    results = _runs([fill] * 3, memory_mb=400, wall_s=10.0)
    assert [(r.status, r.stdout) for r in results] == [(RunStatus.OK, "ok\n")] * 3


@pytest.mark.usefixtures("can_sandbox")
def test_an_exit_interrupted_by_signals_neither_hangs_the_worker_nor_changes_the_result() -> None:
    """A signal that reaches the program while the zygote holds its exit_group restarts the
    call as a new notification (Go's runtime preempts with SIGURG all the time): the worker
    must still let the process die and serve the next request."""
    pester = (  # from another process: a thread of ours would need the GIL os._exit holds
        "import os, signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "signal.siginterrupt(signal.SIGUSR1, False)\n"  # SA_RESTART, as Go's handlers
        "parent = os.getpid()\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        while True:\n"
        "            os.kill(parent, signal.SIGUSR1)\n"
        "time.sleep(0.05)\n"
        "print('bye', flush=True)\n"
        "os._exit(6)\n"
    )

    async def go() -> list[Any]:
        async with SandboxPool(min_workers=1, max_workers=1) as pool:
            out = []
            for code in [*[pester] * 5, "print(1)"]:
                out.append(await asyncio.wait_for(pool.run(code=code), timeout=60))
            return out

    *pestered, after = asyncio.run(go())
    assert [(r.exit_code, r.stdout) for r in pestered] == [(6, "bye\n")] * 5
    assert (after.status, after.stdout) == (RunStatus.OK, "1\n")


@pytest.mark.usefixtures("can_sandbox")
def test_a_zygote_whose_pool_is_gone_before_it_is_ready_exits(tmp_path: Any) -> None:
    """The zygote holds the exit listener it inherits to every program; on its own way out
    (here: no pool left to say "ready" to) it must let go of it first, or its own exit_group
    waits for an answer from itself, forever."""
    from tangram_sandbox.config import default_python
    from tangram_sandbox.isolation import ZYGOTE_ENV, package_root, zygote_command

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cfg = {
        "uid": None,
        "gid": None,
        "apply": dict.fromkeys(
            ("slot_uid", "user_ns", "seccomp", "pid_ns", "mount_ns", "ipc_ns"), False
        ),
        "cache_dir": str(tmp_path),
        "cgroup_dirs": {},
        "tmp_size_mb": 16,
        "drop_sys_path": [package_root()],
    }
    parent.close()  # the pool is gone before the zygote starts
    proc = subprocess.Popen(
        zygote_command(default_python(), str(child.fileno()), cfg),
        pass_fds=(child.fileno(),),
        env=ZYGOTE_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    child.close()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the zygote hung on its way out (its own exit_group held)")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
