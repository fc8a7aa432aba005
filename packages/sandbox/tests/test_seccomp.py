"""The seccomp program: well formed for every table we ship, and enforced in a real child."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from tangram_sandbox import _sys, seccomp


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_filter_is_well_formed(machine: str) -> None:
    prog = seccomp.build_filter(machine)
    assert len(prog) % 8 == 0
    assert 0 < len(prog) // 8 < 4096
    for i in range(len(prog) // 8):
        code, jt, jf, _ = struct.unpack_from("=HBBI", prog, 8 * i)
        # Every jump lands inside the program (BPF jumps are forward only).
        if code & 0x07 == 0x05:
            assert i + 1 + max(jt, jf) < len(prog) // 8


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no syscall table for 'sparc'"):
        seccomp.build_filter("sparc")


@pytest.mark.skipif(not seccomp.supported(), reason="no syscall table for this machine")
def test_filter_denies_network_and_namespaces_but_not_fork() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        seen = []
        try:
            _sys.set_no_new_privs()
            _sys.install_seccomp(seccomp.build_filter())
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    socket.socket(family, socket.SOCK_STREAM).close()
                    seen.append("inet-open")
                except PermissionError:
                    seen.append("inet-denied")
            socket.socket(socket.AF_UNIX).close()
            seen.append("unix-ok")
            try:
                _sys.unshare(_sys.CLONE_NEWUSER)
                seen.append("unshare-open")
            except PermissionError:
                seen.append("unshare-denied")
            child = os.fork()
            if child == 0:
                os._exit(3)
            seen.append(f"fork-{os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])}")
        finally:
            os.write(w, ",".join(seen).encode())
            os._exit(0)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    assert out == "inet-denied,inet-denied,unix-ok,unshare-denied,fork-3"
