"""Linux system calls that Python 3.11's ``os`` lacks, through ctypes.

Why here and stdlib-only: the zygote runs under the system interpreter (so that sandboxed code
can read its stdlib as an unprivileged uid), which has none of the project's dependencies.
Every wrapper raises ``OSError`` with the errno, so callers report *which* layer failed.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "SeccompProgram",
    "bind_writable",
    "install_seccomp",
    "make_rprivate",
    "mount",
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


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace that ``fd`` (an ``/proc/PID/ns/*`` file) refers to."""
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def umount_detach(target: str) -> None:
    """Lazily unmount ``target`` (``MNT_DETACH``)."""
    _check(_libc.umount2(os.fsencode(target), 2), f"umount {target}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """``mount(2)``."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


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
    nr = _SYS_MOUNT_SETATTR.get(platform.machine())
    if nr is None:
        raise OSError(38, f"mount_setattr: unknown syscall number on {platform.machine()}")
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
    _check(res, f"mount_setattr {path}")


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

    def install(self) -> None:
        res = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0)
        _check(res, "prctl(PR_SET_SECCOMP)")


def install_seccomp(program: bytes) -> None:
    """Install a classic-BPF seccomp filter, given as packed ``struct sock_filter`` entries."""
    SeccompProgram(program).install()
