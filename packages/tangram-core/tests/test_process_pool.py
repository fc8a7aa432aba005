"""ProcessPoolManager on real worker processes: results, failures, worker death, scaling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from tangram_core.process_pool import (
    InvalidPayload,
    ProcessPoolConfig,
    ProcessPoolManager,
    cpu_task,
    function_action,
)
from tangram_core.resource_manager import ActionError, ResourceManager, WorkerLost
from tangram_core.testing import pid_alive

SLEEP = "tangram_core.process_pool:sleep_task"
CPU = "tangram_core.process_pool:cpu_task"


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5.0
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if pid_alive(p)], "worker processes outlived shutdown"


def test_is_a_resource_manager_with_capacity_in_cpu_units():
    pool = ProcessPoolManager(2, max_workers=4)
    assert isinstance(pool, ResourceManager)
    assert pool.resources() == {"cpu": 2.0}
    assert pool.limits() == {"cpu": 4.0}
    assert pool.handles("process.call")
    assert not pool.handles("sandbox.run")
    assert pool.supports_resize is False
    asyncio.run(pool.shutdown())  # never opened: nothing to stop


def test_bad_sizes_are_refused_with_the_values():
    with pytest.raises(ValueError, match=r"workers \(3\) <= max_workers \(2\)"):
        ProcessPoolManager(3, max_workers=2)


def test_runs_sleep_and_cpu_tasks_on_separate_workers():
    async def main() -> None:
        pool = ProcessPoolManager(2)
        await pool.open()
        pids = pool.worker_pids()
        assert len(set(pids)) == 2
        slept, hashed = await asyncio.gather(
            pool.start(function_action(SLEEP, 0.2), 1),
            pool.start(function_action(CPU, 200_000), 1),
        )
        assert slept == pytest.approx(0.2)
        assert hashed == cpu_task(200_000)
        assert pool.health()
        await pool.shutdown()
        assert pool.worker_pids() == []
        assert_gone(pids)
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.start(function_action(SLEEP, 0), 1)

    asyncio.run(main())


def test_action_errors_come_back_as_themselves():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        with pytest.raises(ValueError, match="math domain error") as info:
            await pool.start(function_action("math:sqrt", -1), 1)
        assert "in the worker process" in str(info.value.__cause__)
        with pytest.raises(ModuleNotFoundError):
            await pool.start(function_action("no_such_module_xyz:f"), 1)
        with pytest.raises(TypeError, match="cannot be sent back"):
            await pool.start(function_action("threading:Lock"), 1)  # a lock does not pickle
        # The same worker served all three: action errors never cost a worker.
        assert len(pool.worker_pids()) == 1
        await pool.shutdown()

    asyncio.run(main())


def test_payload_is_validated_before_it_reaches_a_worker():
    async def main() -> None:
        pool = ProcessPoolManager(1, config=ProcessPoolConfig(allowed_functions=("math:*",)))
        bad = function_action(SLEEP, 0).model_copy(update={"payload": {"fn": "no colon"}})
        with pytest.raises(InvalidPayload, match="module:function"):
            await pool.start(bad, 1)
        with pytest.raises(InvalidPayload, match="not allowed"):
            await pool.start(function_action(SLEEP, 0), 1)
        with pytest.raises(ValueError, match=r"1\.\.1"):
            await pool.start(function_action("math:sqrt", 4), 2)
        assert await pool.start(function_action("math:sqrt", 4), 1) == 2.0
        await pool.shutdown()

    asyncio.run(main())


def test_user_module_on_spawned_workers_and_an_exception_that_cannot_travel(tmp_path, monkeypatch):
    # Workers get the parent's sys.path, so a caller's own module is importable there. An
    # exception whose __init__ needs two arguments pickles but cannot be rebuilt: it arrives as
    # ActionError carrying the original class name and traceback.
    (tmp_path / "user_tasks.py").write_text(
        textwrap.dedent(
            """
            class NeedsTwo(Exception):
                def __init__(self, a, b):
                    super().__init__(f"{a}-{b}")

            def double(x):
                return 2 * x

            def boom():
                raise NeedsTwo(1, 2)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    async def main() -> None:
        pool = ProcessPoolManager(1, config=ProcessPoolConfig(start_method="spawn"))
        assert await pool.start(function_action("user_tasks:double", 21), 1) == 42
        with pytest.raises(ActionError) as info:
            await pool.start(function_action("user_tasks:boom"), 1)
        assert info.value.error_type == "NeedsTwo"
        assert info.value.message == "1-2"
        assert "in boom" in (info.value.traceback or "")
        await pool.shutdown()

    asyncio.run(main())


def test_elastic_units_reserve_workers_and_reach_the_function():
    async def main() -> None:
        pool = ProcessPoolManager(2)
        await pool.open()
        order: list[str] = []

        async def run(name: str, action_units: int, *args: float, **kwargs: float) -> float:
            out = await pool.start(function_action(SLEEP, *args, kwargs=kwargs), action_units)
            order.append(name)
            return out

        wide = asyncio.create_task(run("wide", 2, 0.4, parallel_fraction=1.0))
        await asyncio.sleep(0.05)
        narrow = asyncio.create_task(run("narrow", 1, 0.01))
        assert await wide == pytest.approx(0.2)  # the function got units=2: T(2) = T(1) / 2
        await narrow
        assert order == ["wide", "narrow"]  # narrow waited: wide held both workers
        await pool.shutdown()

    asyncio.run(main())


def test_killed_worker_fails_its_action_with_worker_lost_and_is_replaced():
    async def main() -> None:
        pool = ProcessPoolManager(2)
        action = function_action(SLEEP, 30)
        task = asyncio.create_task(pool.start(action, 1))
        await wait_for(lambda: action.id in pool.running())
        victim = pool.running()[action.id]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLost, match="SIGKILL") as info:
            await task
        assert info.value.exitcode == -signal.SIGKILL
        assert info.value.pid == victim
        assert info.value.action_id == action.id
        await wait_for(lambda: len(pool.worker_pids()) == 2)
        assert victim not in pool.worker_pids()
        assert pool.health()
        assert await pool.start(function_action(CPU, 10), 1) == cpu_task(10)
        pids = pool.worker_pids()
        await pool.shutdown()
        assert_gone([*pids, victim])

    asyncio.run(main())


def test_worker_exit_code_is_reported():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        with pytest.raises(WorkerLost, match="exited with code 3") as info:
            await pool.start(function_action("os:_exit", 3), 1)
        assert info.value.exitcode == 3
        assert await pool.start(function_action(CPU, 1), 1) == cpu_task(1)
        await pool.shutdown()

    asyncio.run(main())


def test_cancel_drops_a_waiting_action_and_kills_a_running_one():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        running, waiting = function_action(SLEEP, 30), function_action(SLEEP, 0)
        t_running = asyncio.create_task(pool.start(running, 1))
        await wait_for(lambda: running.id in pool.running())
        t_waiting = asyncio.create_task(pool.start(waiting, 1))
        await asyncio.sleep(0.05)
        victim = pool.running()[running.id]

        assert await pool.cancel(waiting.id)
        with pytest.raises(asyncio.CancelledError):
            await t_waiting
        assert await pool.cancel(running.id)
        with pytest.raises(asyncio.CancelledError):
            await t_running
        assert not await pool.cancel("no-such-action")

        # Cancelling the awaiting task works the same way (the orchestrator's timeout path).
        again = function_action(SLEEP, 30)
        t_again = asyncio.create_task(pool.start(again, 1))
        await wait_for(lambda: again.id in pool.running())
        second_victim = pool.running()[again.id]
        t_again.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t_again

        await wait_for(lambda: len(pool.worker_pids()) == 1 and pool.health())
        assert await pool.start(function_action(CPU, 1), 1) == cpu_task(1)
        pids = pool.worker_pids()
        await pool.shutdown()
        assert_gone([*pids, victim, second_victim])

    asyncio.run(main())


def test_scale_to_grows_and_shrinks_without_interrupting_work():
    async def main() -> None:
        pool = ProcessPoolManager(1, max_workers=3)
        await pool.scale_to(3)
        assert pool.resources() == {"cpu": 3.0}
        assert len(pool.worker_pids()) == 3

        busy = function_action(SLEEP, 0.5)
        task = asyncio.create_task(pool.start(busy, 1))
        await wait_for(lambda: busy.id in pool.running())
        busy_pid = pool.running()[busy.id]
        idle_pids = [p for p in pool.worker_pids() if p != busy_pid]

        await pool.scale_to(1)  # the two idle workers leave; the busy one finishes first
        assert pool.resources() == {"cpu": 1.0}
        await wait_for(lambda: pool.worker_pids() == [busy_pid])
        assert not task.done()
        assert await task == pytest.approx(0.5)
        assert pool.worker_pids() == [busy_pid]
        assert_gone(idle_pids)

        with pytest.raises(ValueError, match=r"0\.\.3 workers"):
            await pool.scale_to(4)

        # Shrinking below the busy workers: both actions still finish, then one worker leaves.
        await pool.scale_to(2)
        await wait_for(lambda: len(pool.worker_pids()) == 2)
        both = [function_action(SLEEP, 0.3) for _ in range(2)]
        tasks = [asyncio.create_task(pool.start(a, 1)) for a in both]
        await wait_for(lambda: len(pool.running()) == 2)
        await pool.scale_to(1)
        assert await asyncio.gather(*tasks) == [pytest.approx(0.3)] * 2
        await wait_for(lambda: len(pool.worker_pids()) == 1)

        await pool.scale_to(0)
        await wait_for(lambda: pool.worker_pids() == [])
        await pool.shutdown()

    asyncio.run(main())


def test_shutdown_drains_or_cancels_started_actions():
    async def main() -> None:
        pool = ProcessPoolManager(1)
        task = asyncio.create_task(pool.start(function_action(SLEEP, 0.2), 1))
        await asyncio.sleep(0.05)
        pids = pool.worker_pids()
        await pool.shutdown(drain=True)
        assert await task == pytest.approx(0.2)
        assert_gone(pids)

        pool = ProcessPoolManager(1)
        long = function_action(SLEEP, 30)
        task = asyncio.create_task(pool.start(long, 1))
        await wait_for(lambda: long.id in pool.running())
        pids = pool.worker_pids()
        await asyncio.wait_for(pool.shutdown(drain=False), 10)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_gone(pids)

    asyncio.run(main())


def test_workers_dying_at_start_up_break_the_pool_with_a_clear_message(tmp_path):
    # The classic multiprocessing mistake: no `if __name__ == "__main__":` guard. Each worker
    # re-runs the script and dies; the pool must stop replacing them and say why.
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from tangram_core.process_pool import ProcessPoolManager, function_action
            from tangram_core.resource_manager import WorkerLost

            async def main():
                pool = ProcessPoolManager(1)
                try:
                    for _ in range(5):
                        try:
                            await pool.start(function_action("math:sqrt", 4), 1)
                        except WorkerLost as exc:
                            last = exc
                    print("RESULT", pool.health(), last)
                finally:
                    await pool.shutdown(drain=False)

            asyncio.run(main())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
    assert line.startswith("RESULT False")
    assert "if __name__ == '__main__':" in line
