"""The seccomp deny-list that sandboxed processes run under, as a classic-BPF program.

Why a deny-list and not an allow-list: sandboxed programs are arbitrary Python, C++ and bash
(compilers, interpreters, shells), whose syscall set is open-ended; an allow-list breaks real
programs in ways that look like wrong answers. We deny what lets code leave the sandbox or
see other processes: networking (every socket family but ``AF_UNIX``), ``ptrace`` and
cross-process memory access, mounts and namespace changes (``clone`` with namespace flags,
``unshare``, ``setns``), ``bpf``, keyrings, ``perf_event_open``, ``io_uring`` (whose
operations bypass seccomp), kernel modules, and clock/host changes. Denied calls fail with
``EPERM`` (``ENOSYS`` for ``clone3``, whose flags live in memory seccomp cannot read, so libc
falls back to ``clone``); a foreign architecture or the x32 ABI kills the process.

The program is built here, in plain Python, from the kernel's documented ABI
(``struct seccomp_data``: ``nr`` at offset 0, ``arch`` at 4, ``args[i]`` at ``16 + 8 i``).
"""

from __future__ import annotations

import errno
import os
import struct

__all__ = [
    "DENIED_SYSCALLS",
    "NAMESPACE_CLONE_FLAGS",
    "build_exit_notifier",
    "build_filter",
    "supported",
]

# BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_USER_NOTIF = 0x7FC00000

_AF_UNIX = 1
_X32_SYSCALL_BIT = 0x40000000
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
NAMESPACE_CLONE_FLAGS = 0x7E020000

# name -> (x86_64, aarch64) numbers; aarch64 uses the asm-generic table.
_NUMBERS: dict[str, tuple[int, int]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "unshare": (272, 97),
    "setns": (308, 268),
    "bpf": (321, 280),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "perf_event_open": (298, 241),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "userfaultfd": (323, 282),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "fanotify_init": (300, 262),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "syslog": (103, 116),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "vhangup": (153, 58),
}
_SOCKET = (41, 198)
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_EXIT_GROUP = (231, 94)
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}

#: Syscalls denied outright (``socket`` and ``clone`` are denied by argument, see module doc).
DENIED_SYSCALLS: tuple[str, ...] = tuple(sorted(_NUMBERS))


def supported(machine: str | None = None) -> bool:
    """Whether this module knows the syscall table of ``machine`` (default: this one)."""
    return (machine or os.uname().machine) in _ARCH


def _ins(code: int, jt: int, jf: int, k: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def build_filter(machine: str | None = None) -> bytes:
    """The packed filter for ``machine``; raises ``ValueError`` for an unknown architecture."""
    machine = machine or os.uname().machine
    if machine not in _ARCH:
        raise ValueError(f"seccomp: no syscall table for {machine!r} (have {sorted(_ARCH)})")
    col, audit_arch = _ARCH[machine]
    deny_eperm = _RET_ERRNO | errno.EPERM
    deny_enosys = _RET_ERRNO | errno.ENOSYS

    # Layout: header, one JEQ per denied number, then the shared targets in a fixed tail.
    denied = sorted({nums[col] for nums in _NUMBERS.values()})
    head: list[tuple[int, int, int, int] | str] = [
        _ins(_LD_W_ABS, 0, 0, 4),  # A = arch
        "JEQ_ARCH",
        _ins(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _ins(_LD_W_ABS, 0, 0, 0),  # A = nr
    ]
    if machine == "x86_64":
        head.append("JGE_X32")
    head += [f"DENY {nr}" for nr in denied]
    head += ["SOCKET", "CLONE", "CLONE3", _ins(_RET_K, 0, 0, _RET_ALLOW)]
    # The shared targets follow ``head``: EPERM, ENOSYS, the socket check (4), the clone check.
    base = len(head)
    where = {"EPERM": base, "ENOSYS": base + 1, "SOCKET_CHECK": base + 2, "CLONE_CHECK": base + 6}

    out: list[tuple[int, int, int, int]] = []
    for i, item in enumerate(head):
        if not isinstance(item, str):
            out.append(item)
            continue

        def jump(label: str, i: int = i) -> int:
            off = where[label] - (i + 1)
            if not 0 <= off <= 255:
                raise AssertionError("seccomp program too long for an 8-bit jump")
            return off

        if item == "JEQ_ARCH":
            out.append(_ins(_JEQ_K, 1, 0, audit_arch))
        elif item == "JGE_X32":
            out.append(_ins(_JGE_K, jump("ENOSYS"), 0, _X32_SYSCALL_BIT))
        elif item.startswith("DENY "):
            out.append(_ins(_JEQ_K, jump("EPERM"), 0, int(item.split()[1])))
        elif item == "SOCKET":
            out.append(_ins(_JEQ_K, jump("SOCKET_CHECK"), 0, _SOCKET[col]))
        elif item == "CLONE":
            out.append(_ins(_JEQ_K, jump("CLONE_CHECK"), 0, _CLONE[col]))
        elif item == "CLONE3":
            out.append(_ins(_JEQ_K, jump("ENOSYS"), 0, _CLONE3[col]))
    out += [
        _ins(_RET_K, 0, 0, deny_eperm),  # EPERM
        _ins(_RET_K, 0, 0, deny_enosys),  # ENOSYS
        # SOCKET_CHECK: socket(domain, ...) is allowed for AF_UNIX only.
        _ins(_LD_W_ABS, 0, 0, 16),
        _ins(_JEQ_K, 0, 1, _AF_UNIX),
        _ins(_RET_K, 0, 0, _RET_ALLOW),
        _ins(_RET_K, 0, 0, deny_eperm),
        # CLONE_CHECK: clone(flags, ...) may not create namespaces.
        _ins(_LD_W_ABS, 0, 0, 16),
        _ins(_JSET_K, 0, 1, NAMESPACE_CLONE_FLAGS),
        _ins(_RET_K, 0, 0, deny_eperm),
        _ins(_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in out)


def build_exit_notifier(machine: str | None = None) -> bytes:
    """A filter that hands ``exit_group`` to a supervisor (``SECCOMP_RET_USER_NOTIF``) and
    allows everything else; installed on top of :func:`build_filter`'s.

    Why: a process's end is reported by the kernel only after it has torn down its address
    space, which for a fork of the warm zygote (~15 MB mapped) is about half a millisecond,
    a third of a warm run. The notification comes from the kernel when the program calls
    ``exit_group``, before any teardown, with the exit status in its first argument: as
    trustworthy as ``wait4`` (a program cannot forge one), so the zygote can answer first and
    let the process finish dying afterwards. Deaths by signal make no ``exit_group`` call and
    are seen the usual way."""
    machine = machine or os.uname().machine
    if machine not in _ARCH:
        raise ValueError(f"seccomp: no syscall table for {machine!r} (have {sorted(_ARCH)})")
    col, audit_arch = _ARCH[machine]
    out = [
        _ins(_LD_W_ABS, 0, 0, 4),  # A = arch
        _ins(_JEQ_K, 0, 3, audit_arch),  # a foreign one: allow here (the deny-list kills it)
        _ins(_LD_W_ABS, 0, 0, 0),  # A = nr
        _ins(_JEQ_K, 0, 1, _EXIT_GROUP[col]),
        _ins(_RET_K, 0, 0, _RET_USER_NOTIF),
        _ins(_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in out)
