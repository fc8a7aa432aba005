"""The host's view of its processes, from ``/proc``: what the sandbox tests check a pool
left running (or killed), as the host sees it (a sandbox's user namespace shows other uids).

Not a test module: the sandbox tests import it (their ``conftest.py`` puts this directory on
``sys.path``)."""

from __future__ import annotations

import os
from typing import NamedTuple


class Proc(NamedTuple):
    pid: int
    ppid: int
    uid: int  # real uid as the host sees it (the sandbox's user namespace shows 65534)
    state: str  # R, S, D, Z, ...
    name: str


def processes() -> dict[int, Proc]:
    """Every process on the host, by pid, from ``/proc/*/status``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields: dict[str, list[str]] = {}
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key] = value.split()
        except OSError:  # it exited while we looked
            continue
        name = fields["Name"][0] if fields.get("Name") else ""
        found[int(entry)] = Proc(
            int(entry), int(fields["PPid"][0]), int(fields["Uid"][0]), fields["State"][0], name
        )
    return found


def live_children(pid: int) -> list[int]:
    """Pids of ``pid``'s children that still run (not zombies)."""
    return [p.pid for p in processes().values() if p.ppid == pid and p.state != "Z"]
