"""A watchdog that stops what a run started once the run is gone, even after ``kill -9``.

Why: a run's children do not die with it. vLLM's ``EngineCore`` and its worker (about 2.5 GB
with a 135M model), the two ``/dev/shm/psm_*`` segments of vLLM's message queues (400 MiB),
Ray's processes and the sandbox pool all outlive a run killed with SIGKILL, which can run no
clean-up of its own. A parent-death signal (``PR_SET_PDEATHSIG``) cannot be set inside the
processes vLLM spawns, and it fires when the forking *thread* ends, not the process; a new
process group would take the run out of the terminal's job control (Ctrl-C would miss it).

So ``r1-train run`` starts this small process (:func:`start_reaper`) in a session of its own.
It follows the run from outside: every ``poll_s`` it records the run's descendants (pid and
start time, so a reused pid is never mistaken for one) and the ``psm_*`` segments they map.
When the run's process is gone (or a zombie), it SIGKILLs every recorded process still alive
with the same start time, and their own children, unlinks the recorded segments and removes
the run's ``/dev/shm/r1-train-weights-PID-*`` folder, then reports on stderr what it stopped.
After a clean exit there is nothing left to stop and it says nothing.

Linux only (it reads ``/proc``); elsewhere :func:`start_reaper` does nothing. Standard library
only, so that it starts in a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PSM_DIR = "/dev/shm"
# vLLM's message queues (multiprocessing.shared_memory) and multiprocessing's named semaphores,
# which multiprocessing's resource tracker would unlink, had it not been killed with the rest
SEGMENT_PREFIXES = (f"{PSM_DIR}/psm_", f"{PSM_DIR}/sem.mp-")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start time)`` of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _table() -> dict[int, tuple[str, int, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    return table


def descendants(root: int, table: dict[int, tuple[str, int, int]]) -> set[int]:
    """Every process below ``root`` in ``table`` (pid -> (state, ppid, start))."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _segments(pid: int) -> set[str]:
    """The shared-memory files under :data:`SEGMENT_PREFIXES` that ``pid`` maps."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    found = set()
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith(SEGMENT_PREFIXES) and not path.endswith("(deleted)"):
            found.add(path)
    return found


def watch(parent: int, poll_s: float = 0.5) -> list[str]:
    """Follow ``parent`` until it is gone, then stop what it left; returns what was stopped."""
    first = _stat(parent)
    if first is None:
        return []
    parent_start = first[2]
    me = os.getpid()
    known: dict[int, int] = {}  # pid -> start time
    segments: set[str] = set()
    tick = 0
    while True:
        st = _stat(parent)
        if st is None or st[2] != parent_start or st[0] == "Z":
            break
        table = _table()
        for pid in descendants(parent, table) - {me}:
            if known.setdefault(pid, table[pid][2]) != table[pid][2]:
                known[pid] = table[pid][2]  # a pid reused under the run
        for pid in [p for p, start in known.items() if table.get(p, ("", 0, -1))[2] != start]:
            del known[pid]  # ended
        if tick % 4 == 0:  # the segments are made at engine start; no need to look each time
            for pid in known:
                segments |= _segments(pid)
        tick += 1
        time.sleep(poll_s)
    return _stop(parent, known, segments)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pids: set[int]) -> list[str]:
    """SIGKILL each of ``pids``; returns those signalled, named."""
    done = []
    for pid in sorted(pids):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        done.append(f"process {pid} ({name})")
    return done


def _stop(parent: int, known: dict[int, int], segments: set[str]) -> list[str]:
    table = _table()
    victims = {pid for pid, start in known.items() if table.get(pid, ("", 0, -1))[2] == start}
    for pid in list(victims):
        victims |= descendants(pid, table)
    victims.discard(os.getpid())
    # multiprocessing's resource tracker unlinks the named semaphores and segments registered
    # with it once every process holding its pipe is gone: it is stopped last, and only if it
    # has not finished by itself within a few seconds
    trackers = {p for p in victims if "multiprocessing.resource_tracker" in _cmdline(p)}
    stopped = _kill(victims - trackers)
    deadline = time.monotonic() + 5.0
    while trackers and time.monotonic() < deadline:
        time.sleep(0.1)
        trackers = {p for p in trackers if (st := _stat(p)) is not None and st[0] != "Z"}
    stopped += _kill(trackers)
    for path in sorted(segments):
        try:
            os.unlink(path)
        except OSError:
            continue
        stopped.append(f"shared memory {path}")
    for folder in Path(PSM_DIR).glob(f"r1-train-weights-{parent}-*"):
        shutil.rmtree(folder, ignore_errors=True)
        stopped.append(f"weight-sync folder {folder}")
    return stopped


def start_reaper(parent: int | None = None) -> subprocess.Popen[bytes] | None:
    """Start the watchdog over ``parent`` (this process by default); None where ``/proc`` is
    missing. It runs in its own session, so the terminal's Ctrl-C does not stop it first."""
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "r1_train.reaper", str(parent or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(argv[0])
    stopped = watch(parent)
    if stopped:
        print(
            f"r1-train: the run (pid {parent}) ended and left {len(stopped)} thing(s) behind; "
            "stopped: " + ", ".join(stopped),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
