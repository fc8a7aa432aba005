"""The real pool, end to end: languages, statuses, batches, files, scaling and backpressure."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from host_processes import live_children

from tangram_sandbox import wire
from tangram_sandbox.models import RunRequest, RunStatus
from tangram_sandbox.pool import QueueFull, SandboxPool

pytestmark = pytest.mark.usefixtures("can_sandbox")

CPP_SUM = "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}\n"


def with_pool(body: Callable[[SandboxPool], Awaitable[Any]], **config: Any) -> Any:
    async def go() -> Any:
        async with SandboxPool(**{"min_workers": 1, "max_workers": 2, **config}) as pool:
            return await body(pool)

    return asyncio.run(go())


def test_python_bash_and_cpp_read_stdin_and_answer(tmp_path: Any) -> None:
    async def body(pool: SandboxPool) -> list[Any]:
        return [
            await pool.run(code="a, b = map(int, input().split()); print(a * b)", stdin="6 7"),
            await pool.run(code="read a b; echo $((a - b))", language="bash", stdin="9 2"),
            await pool.run(code=CPP_SUM, language="cpp", stdin="40 2"),
            await pool.run(code=CPP_SUM, language="cpp", stdin="1 2"),  # from the cache
        ]

    py, sh, cpp, cached = with_pool(body, cache_dir=str(tmp_path))
    assert (py.status, py.stdout) == (RunStatus.OK, "42\n")
    assert (sh.status, sh.stdout) == (RunStatus.OK, "7\n")
    assert (cpp.status, cpp.stdout) == (RunStatus.OK, "42\n")
    assert (cached.status, cached.stdout) == (RunStatus.OK, "3\n")
    assert len(list(tmp_path.iterdir())) == 1, "one cached binary per source hash"


STDIO_PROBE = r"""
import json, os, sys
streams = {}
for name in ("stdin", "stdout", "stderr"):
    s = getattr(sys, name)
    streams[name] = [s.seekable(), s.encoding, s.errors, s.line_buffering, s.buffer.raw.name]
try:
    sys.stdout.tell()
    tell = "no error"
except Exception as exc:
    tell = type(exc).__name__
print(json.dumps({"streams": streams, "tell": tell, "input": sys.stdin.read(),
                  "environ": dict(os.environ)}))
"""


def test_a_programs_stdio_and_environment_are_plain_pythons_over_pipes() -> None:
    """The program's ``sys.std*`` are made in the zygote before any fork (fewer pages to copy
    per run) and its environment is inherited from the zygote's: neither may show. Its stdout
    and stderr are pipes, so not seekable (made over the zygote's own /dev/null they would
    claim to be); its stdin is the request's input; its environment is exactly the programs'
    own. Run twice: each program takes its own copy of the zygote's streams."""
    import json

    from tangram_sandbox.program import PROGRAM_ENV

    async def body(pool: SandboxPool) -> list[Any]:
        return [await pool.run(code=STDIO_PROBE, stdin=f"line {i}\n") for i in range(2)]

    for i, result in enumerate(with_pool(body, max_workers=1)):
        assert result.status is RunStatus.OK, result
        got = json.loads(result.stdout)
        assert got["streams"] == {
            "stdin": [True, "utf-8", "replace", False, 0],
            "stdout": [False, "utf-8", "replace", False, 1],
            "stderr": [False, "utf-8", "backslashreplace", True, 2],
        }, got
        assert got["tell"] == "UnsupportedOperation", got
        assert got["input"] == f"line {i}\n", got
        assert got["environ"] == PROGRAM_ENV, got


def test_each_failure_has_its_own_status() -> None:
    async def body(pool: SandboxPool) -> dict[str, Any]:
        small = {"wall_s": 1.0, "memory_mb": 128}
        return {
            "runtime": await pool.run(code="raise ValueError('boom')"),
            "syntax": await pool.run(code="def f(:\n"),
            "exit3": await pool.run(code="import sys; sys.exit(3)"),
            "timeout": await pool.run(code="while True: pass", limits=small),
            "memory": await pool.run(code="x = bytearray(1 << 30)", limits=small),
            "cpp": await pool.run(code="int main( {", language="cpp"),
        }

    got = with_pool(body)
    assert got["runtime"].status is RunStatus.RUNTIME_ERROR
    assert "ValueError: boom" in got["runtime"].stderr
    assert got["syntax"].status is RunStatus.COMPILE_ERROR
    assert (got["exit3"].status, got["exit3"].exit_code) == (RunStatus.RUNTIME_ERROR, 3)
    assert got["timeout"].status is RunStatus.TIMEOUT
    assert 0.9 < got["timeout"].wall_s < 3.0
    assert got["memory"].status is RunStatus.MEMORY_LIMIT
    assert got["cpp"].status is RunStatus.COMPILE_ERROR
    assert "error" in got["cpp"].stderr


@pytest.mark.parametrize("isolation", ["batch", "per_test"])
def test_run_tests_judges_stdin_and_function_tests(isolation: str) -> None:
    code = (
        "def add(a, b):\n    return a + b\n"
        "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n"
    )

    async def body(pool: SandboxPool) -> list[Any]:
        stdin_tests = [{"stdin": f"{i} {i}", "expected_stdout": str(2 * i)} for i in range(10)]
        stdin_tests[3]["expected_stdout"] = "wrong"
        calls = [
            {"fn": "add", "args": [1, 2], "expected": 3},
            {"fn": "add", "args": [0.1, 0.2], "expected": 0.3},
            {"fn": "add", "args": [[1], [2]], "expected": [1, 2]},
            {"fn": "add", "args": [1, 1], "expected": 3},
            {"fn": "missing", "expected": 0},
        ]
        return [
            await pool.run_tests(code=code, tests=stdin_tests, isolation=isolation),
            await pool.run_tests(
                code="import sys\n" + code.split("if")[0], tests=calls, isolation=isolation
            ),
            await pool.run_tests(
                code=code, tests=stdin_tests, stop_on_first_failure=True, isolation=isolation
            ),
        ]

    stdin_res, call_res, stopped = with_pool(body)
    assert stdin_res.status is RunStatus.OK
    assert (stdin_res.passed, stdin_res.total, stdin_res.pass_fraction) == (9, 10, 0.9)
    assert [v.index for v in stdin_res.verdicts if not v.passed] == [3]
    assert [v.passed for v in call_res.verdicts] == [True, True, True, False, False]
    assert call_res.verdicts[3].message == "returned 2"
    assert call_res.verdicts[4].status is RunStatus.RUNTIME_ERROR
    assert len(stopped.verdicts) == 4
    assert stopped.passed == 3


def test_files_go_in_and_come_back_without_following_links() -> None:
    async def body(pool: SandboxPool) -> Any:
        return await pool.run(
            code=(
                "import os\n"
                "print(open('data/in.txt').read())\n"
                "open('out.txt', 'w').write('result')\n"
                "os.symlink('/etc/passwd', 'leak')\n"
            ),
            files={"data/in.txt": base64.b64encode(b"payload").decode()},
            fetch_files=["out.txt", "leak", "absent"],
        )

    res = with_pool(body)
    assert res.status is RunStatus.OK
    assert res.stdout == "payload\n"
    assert base64.b64decode(res.files["out.txt"]) == b"result"
    assert "leak" not in res.files
    assert "absent" not in res.files
    assert res.error is not None
    assert "leak" in res.error
    assert "absent" in res.error


def test_a_job_marked_last_ends_its_request_without_a_fetch() -> None:
    """A run with nothing to fetch sends its job marked ``last`` and no fetch: the worker
    answers at once and lets the program's files go with the answer. Driven at the protocol
    level, so that both halves show: a fetch after an unmarked job still finds the program's
    files; after a marked one, there is no program left to fetch from."""

    async def fetch_after(pool: SandboxPool, last: bool) -> dict[str, Any]:
        req = RunRequest(code="open('out.txt', 'w').write('kept')")
        limits = req.limits.clamp(pool.config.max_limits)
        async with pool._worker() as worker:
            await worker.send(pool._talk.job_frames(req, limits, last=last))
            end = await pool._talk.read_job(worker, limits)
            assert end["exit_code"] == 0
            await worker.send(wire.encode_json({"op": "fetch", "names": ["out.txt"]}))
            return await pool._talk.read_fetch(worker)

    async def body(pool: SandboxPool) -> Any:
        kept = await fetch_after(pool, last=False)
        gone = await fetch_after(pool, last=True)
        after = await pool.run(code="print(1)")  # the worker is still in step
        fetched = await pool.run(
            code="open('o', 'w').write('x')", fetch_files=["o"]
        )  # and a request with a fetch still gets its files
        return kept, gone, after, fetched

    kept, gone, after, fetched = with_pool(body, max_workers=1)
    assert base64.b64decode(kept["out.txt"]["content_b64"]) == b"kept"
    assert gone == {"out.txt": {"error": "no program ran"}}
    assert after.status is RunStatus.OK
    assert after.stdout == "1\n"
    assert base64.b64decode(fetched.files["o"]) == b"x"


def test_output_that_fills_its_pipes_before_they_are_watched_arrives_whole() -> None:
    """A worker watches a program's streams only a few milliseconds into its run (a short
    program's output is taken with its exit). One that fills both pipes at once, many times
    over, must still run to its end with every byte of both streams, in order."""
    code = (
        "import sys\n"
        "for i in range(64):\n"
        "    sys.stdout.write(f'{i:04d}' + 'o' * 8187 + '\\n')\n"
        "    sys.stderr.write(f'{i:04d}' + 'e' * 8187 + '\\n')\n"
        "sys.stdout.flush()\n"
        "print('done')\n"
    )

    async def body(pool: SandboxPool) -> Any:
        return await pool.run(code=code)

    res = with_pool(body, max_workers=1)
    assert res.status is RunStatus.OK, res
    lines = res.stdout.splitlines()
    assert lines[-1] == "done"
    assert lines[:-1] == [f"{i:04d}" + "o" * 8187 for i in range(64)]
    assert res.stderr.splitlines() == [f"{i:04d}" + "e" * 8187 for i in range(64)]
    assert not res.stdout_truncated
    assert not res.stderr_truncated


def test_a_spare_killed_before_its_job_fails_that_run_alone() -> None:
    """Killed from outside while it waits for its job, a worker's spare program process
    fails the one run it was meant for, with a sandbox error; the worker drops the rest of
    that job from its stream and serves the next run itself (no replacement)."""

    async def body(pool: SandboxPool) -> Any:
        await pool.run(code="print(1)")
        (worker,) = pool._workers
        for _ in range(100):  # the next spare forks (and mounts) after the answer
            await asyncio.sleep(0.02)
            spares = live_children(worker.pid)
            if len(spares) == 1:
                break
        await asyncio.sleep(0.1)
        os.kill(spares[0], signal.SIGKILL)
        while spares[0] in live_children(worker.pid):  # dead, with its end of the job pipe
            await asyncio.sleep(0.01)
        failed = await pool.run(code="print('x' * 100000)")
        after = await pool.run(code="print(2)")
        return worker.pid, failed, after, {w.pid for w in pool._workers}, pool.replaced

    zygote, failed, after, workers, replaced = with_pool(body, min_workers=1, max_workers=1)
    assert failed.status is RunStatus.SANDBOX_ERROR, failed
    assert after.status is RunStatus.OK, after
    assert after.stdout == "2\n"
    assert workers == {zygote}
    assert replaced == 0


def test_scale_to_grows_and_shrinks_between_bounds() -> None:
    async def body(pool: SandboxPool) -> list[int]:
        sizes = [pool.size]
        await pool.scale_to(3)
        await pool.wait_ready()
        sizes.append(pool.size)
        await pool.scale_to(0)  # floor: min_workers
        sizes.append(pool.size)
        with pytest.raises(ValueError, match="max_workers=3"):
            await pool.scale_to(4)
        res = await pool.run(code="print('still serving')")
        assert res.stdout == "still serving\n"
        return sizes

    assert with_pool(body, min_workers=1, max_workers=3) == [1, 3, 1]


def test_full_queue_refuses_at_once_and_loses_nothing_queued() -> None:
    async def body(pool: SandboxPool) -> None:
        first = asyncio.create_task(pool.run(code="import time; time.sleep(0.5); print('a')"))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(pool.run(code="print('b')"))
        await asyncio.sleep(0.05)
        assert pool.queued == 1
        with pytest.raises(QueueFull, match="max_queue=1"):
            await pool.run(code="print('c')")
        a, b = await asyncio.gather(first, second)
        assert (a.stdout, b.stdout) == ("a\n", "b\n")

    with_pool(body, min_workers=1, max_workers=1, max_queue=1)


def test_cancelling_a_run_kills_its_program_and_replaces_the_worker() -> None:
    async def body(pool: SandboxPool) -> None:
        task = asyncio.create_task(pool.run(code="import time; time.sleep(30)"))
        await asyncio.sleep(0.5)
        victim = next(iter(pool._workers))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.wait_ready(timeout=10)
        assert victim not in pool._workers
        res = await pool.run(code="print(1)")
        assert res.status is RunStatus.OK

    with_pool(body, min_workers=1, max_workers=1)


def test_strict_isolation_refuses_when_a_layer_is_missing() -> None:
    from tangram_sandbox.pool import SandboxUnavailable

    async def go() -> None:
        # A Python that cannot run the zygote makes every layer fail the probe.
        async with SandboxPool(isolation="strict", python="/bin/false"):
            pass

    with pytest.raises(SandboxUnavailable, match=r"isolation='strict'.*user_ns"):
        asyncio.run(go())


def test_batch_survives_a_test_that_kills_or_hangs_its_process() -> None:
    code = (
        "import os, time\n"
        "n = int(input())\n"
        "if n == 2:\n    os._exit(9)\n"
        "if n == 4:\n    time.sleep(30)\n"
        "if n == 5:\n    x = bytearray(1 << 30)\n"
        "print(n * 10)\n"
    )
    tests = [{"stdin": str(i), "expected_stdout": str(i * 10)} for i in range(8)]

    async def body(pool: SandboxPool) -> Any:
        limits = {"wall_s": 1.0, "memory_mb": 256}
        return await pool.run_tests(code=code, tests=tests, limits=limits)

    res = with_pool(body)
    assert res.status is RunStatus.OK
    assert [v.index for v in res.verdicts] == list(range(8))
    by_index = {v.index: v for v in res.verdicts}
    assert by_index[2].status is RunStatus.RUNTIME_ERROR
    assert by_index[4].status is RunStatus.TIMEOUT
    assert by_index[5].status is RunStatus.MEMORY_LIMIT
    assert [i for i, v in by_index.items() if v.passed] == [0, 1, 3, 6, 7]


def test_batch_runs_cpp_and_bash_tests_as_child_processes(tmp_path: Any) -> None:
    tests = [{"stdin": f"{i} {i}", "expected_stdout": str(2 * i)} for i in range(6)]

    async def body(pool: SandboxPool) -> list[Any]:
        return [
            await pool.run_tests(code=CPP_SUM, language="cpp", tests=tests),
            await pool.run_tests(code="read a b; echo $((a + b))", language="bash", tests=tests),
            await pool.run_tests(code="int main( {", language="cpp", tests=tests),
        ]

    cpp, bash, broken = with_pool(body, cache_dir=str(tmp_path))
    assert (cpp.status, cpp.passed) == (RunStatus.OK, 6)
    assert (bash.status, bash.passed) == (RunStatus.OK, 6)
    assert broken.status is RunStatus.COMPILE_ERROR
    assert broken.verdicts == []
