"""``kill -9`` of a real ``r1-train run``: nothing it started may outlive it.

The run (tiny model, in-process vLLM on CPU) is started as the user starts it, in a child
process. Once its vLLM engine is up, the test records every process below the run and the
``/dev/shm/psm_*`` segments they map, kills the run with SIGKILL, and checks that all of them
are gone within seconds, with the run's weight-sync folder (the reaper in
``r1_train.reaper`` does it; the next start also removes a dead run's folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1_train.reaper import _segments, _table, descendants

pytestmark = pytest.mark.slow


def _wait(what: str, cond, timeout_s: float) -> None:  # cond: a predicate
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_kill_9_of_a_run_leaves_no_process_no_segment_and_no_weight_folder(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this host")
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r1_train",
            "run",
            f"model.path={tiny_model_dir}",
            "model.dtype=float32",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "rollout.max_total_tokens=256",
            "task.kind=arithmetic",
            "task.size=8",
            "rewards.weights={math: 1.0}",
            "run.steps=100",
            "run.prompts_per_step=2",
            "run.progress=false",
            "run.tensorboard=false",
            f"run.out_dir={tmp_path / 'run'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    recorded: dict[int, int] = {}
    try:

        def engine_up() -> bool:
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            table = _table()
            below = descendants(run.pid, table)
            if not any("EngineCore" in _cmdline(p) for p in below):
                return False
            recorded.update({p: table[p][2] for p in below if p in table})
            return any(_segments(p) for p in below)

        _wait("the run's vLLM engine", engine_up, 180)
        time.sleep(1.0)  # the reaper polls every 0.5 s: let it see the whole tree
        table = _table()
        below = descendants(run.pid, table)
        recorded.update({p: table[p][2] for p in below if p in table})
        segments = set().union(*(_segments(p) for p in below))
        weights = list(Path("/dev/shm").glob(f"r1-train-weights-{run.pid}-*"))
        assert segments, "vLLM maps its message-queue segments"
        assert weights, "the run made its weight-sync folder"

        os.kill(run.pid, signal.SIGKILL)
        run.wait()

        def alive() -> list[str]:
            now = _table()
            return [
                f"{p} {_cmdline(p)[:80]}"
                for p, start in recorded.items()
                if p in now and now[p][2] == start and now[p][0] != "Z"
            ]

        _wait("the run's children to die", lambda: not alive(), 30)
        _wait("the segments to go", lambda: not any(Path(s).exists() for s in segments), 10)
        assert not any(w.exists() for w in weights)
        _wait("the reaper's report", lambda: "left" in (tmp_path / "run.log").read_text(), 10)
        report = (tmp_path / "run.log").read_text()
        assert f"the run (pid {run.pid}) ended" in report, report[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        now = _table()
        for pid, start in recorded.items():  # never leave the test's own processes behind
            if pid in now and now[pid][2] == start:
                os.kill(pid, signal.SIGKILL)
        log.close()
