"""Linux system calls that Python 3.11's ``os`` lacks, through ctypes.

Why here and stdlib-only: the zygote runs under the system interpreter (so that sandboxed code
can read its stdlib as an unprivileged uid), which has none of the project's dependencies.
Every wrapper raises ``OSError`` with the errno, so callers report *which* layer failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
from typing import NamedTuple

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "ExitNotice",
    "SeccompProgram",
    "bind_writable",
    "install_listener",
    "install_seccomp",
    "make_rprivate",
    "mount",
    "notice_continue",
    "notice_recv",
    "remount_tree_readonly",
    "set_dumpable",
    "set_no_new_privs",
    "set_pdeathsig",
    "sethostname",
    "setns",
    "umount_detach",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
# _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp)
_NOTIF_RECV = 0xC0502100
_NOTIF_SEND = 0xC0182101
_NOTIF = struct.Struct("=QII iIQ6Q")  # id, pid, flags, seccomp_data{nr, arch, ip, args[6]}
_NOTIF_RESP = struct.Struct("=QqiI")  # id, val, error, flags

# The interpreter's own symbols include libc. (ctypes.util.find_library would run ldconfig
# and pull subprocess and friends into the zygote, whose every page each fork copies.)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, *args: object) -> None:
    """Raise ``OSError`` naming the call (``what.format(*args)``) if it failed.

    The name is formatted only on failure: the success path runs in every program's set-up,
    where each object made is a page of the zygote that process copies."""
    if result < 0:
        err = ctypes.get_errno()
        names = [os.fsdecode(a) if isinstance(a, bytes) else a for a in args]
        raise OSError(err, f"{what.format(*names)}: {os.strerror(err)}")


def _b(value: str | bytes | None) -> bytes | None:
    return value if value is None or isinstance(value, bytes) else os.fsencode(value)


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(flags), "unshare({:#x})", flags)


def setns(fd: int, nstype: int) -> None:
    """Join the namespace that ``fd`` (an ``/proc/PID/ns/*`` file) refers to."""
    _check(_libc.setns(fd, nstype), "setns({:#x})", nstype)


def umount_detach(target: str) -> None:
    """Lazily unmount ``target`` (``MNT_DETACH``)."""
    _check(_libc.umount2(os.fsencode(target), 2), "umount {}", target)


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int,
    data: str | bytes | None = None,
) -> None:
    """``mount(2)``; bytes arguments are passed as they are (no encoding per call)."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount {}", target)


def make_rprivate() -> None:
    """Stop mount events propagating back to the host: our mounts stay in our namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount_setattr(path: str, attr_set: int, attr_clr: int, recursive: bool) -> None:
    nr = _SYS_MOUNT_SETATTR.get(os.uname().machine)
    if nr is None:
        raise OSError(38, f"mount_setattr: unknown syscall number on {os.uname().machine}")
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    res = _libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(res, "mount_setattr {}", path)


def remount_tree_readonly(path: str = "/") -> None:
    """Make every mount under ``path`` read-only in this mount namespace, in one call.

    ``mount_setattr(AT_RECURSIVE)`` (Linux 5.12) covers submounts (``/dev``, ``/sys``, bind
    mounts) that a ``MS_REMOUNT|MS_RDONLY`` on ``/`` alone would leave writable."""
    _mount_setattr(path, _MOUNT_ATTR_RDONLY, 0, recursive=True)


def bind_writable(path: str) -> None:
    """Bind ``path`` onto itself and clear read-only on that one mount: a writable hole in the
    read-only tree for state the trusted supervisor keeps (compile cache, cgroup files)."""
    mount(path, path, None, MS_BIND)
    _mount_setattr(path, 0, _MOUNT_ATTR_RDONLY, recursive=False)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), what)


def set_no_new_privs() -> None:
    """No setuid binary can raise privileges again; also what unprivileged seccomp requires."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def set_pdeathsig(sig: int) -> None:
    """Receive ``sig`` when the parent dies: a supervisor's death takes its sandbox with it."""
    _prctl(PR_SET_PDEATHSIG, sig, "prctl(PR_SET_PDEATHSIG)")


def set_dumpable(on: bool) -> None:
    """Non-dumpable processes' ``/proc/PID/{mem,fd,environ}`` are closed to same-uid peers."""
    _prctl(PR_SET_DUMPABLE, 1 if on else 0, "prctl(PR_SET_DUMPABLE)")


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A filter packed once (in the zygote) and installed in each program's process: building
    and marshalling it per execution costs about a millisecond on a VM, installing it not."""

    def __init__(self, program: bytes) -> None:
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._prog = _Fprog(len(program) // 8, ctypes.cast(self._buf, ctypes.c_void_p).value)

    @property
    def address(self) -> int:
        """Where the ``struct sock_fprog`` lives, for ``seccomp(2)``."""
        return ctypes.addressof(self._prog)

    def install(self) -> None:
        res = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self.address, 0, 0)
        _check(res, "prctl(PR_SET_SECCOMP)")


def install_seccomp(program: bytes) -> None:
    """Install a classic-BPF seccomp filter, given as packed ``struct sock_filter`` entries."""
    SeccompProgram(program).install()


def install_listener(program: SeccompProgram) -> int:
    """Install ``program`` with a user-notification listener; the listener's fd.

    Needs no_new_privs (or CAP_SYS_ADMIN); fails with ``EBUSY`` where a filter of this task
    already has a listener."""
    nr = _SYS_SECCOMP.get(os.uname().machine)
    if nr is None:
        raise OSError(0, f"seccomp: no syscall number for {os.uname().machine}")
    fd = _libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(_SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.c_void_p(program.address),
    )
    _check(fd, "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
    return int(fd)


class ExitNotice(NamedTuple):
    """One held system call: its notification id, the caller's pid (tid) as this process's
    pid namespace sees it, and the call's first argument (``exit_group``'s status)."""

    id: int
    pid: int
    nr: int
    arg0: int


def notice_recv(listener: int) -> ExitNotice:
    """Take the pending notification off ``listener`` (``ENOENT``: its caller died first)."""
    buf = bytearray(_NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, _NOTIF_RECV, buf, True)
    nid, pid, _flags, nr, _arch, _ip, arg0, *_ = _NOTIF.unpack(buf)
    return ExitNotice(nid, pid, nr, arg0)


def notice_continue(listener: int, notice_id: int) -> None:
    """Let the held call proceed as if no filter had stopped it; a caller that died since
    (``ENOENT``) needs nothing."""
    resp = bytearray(_NOTIF_RESP.pack(notice_id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE))
    with contextlib.suppress(FileNotFoundError):
        fcntl.ioctl(listener, _NOTIF_SEND, resp, True)
