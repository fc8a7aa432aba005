#!/usr/bin/env python3
"""tangram-sandbox's warm pool vs starting a sandboxed interpreter per execution.

Why: the pool exists so that an RL step does not pay an interpreter start (plus a namespace
set-up) for every program it scores, and so that a batch of test cases costs one request, not
one request per test. Each figure below is measured against its baseline in the same run, on
the same machine:

1. **Warm latency**: sequential ``await pool.run(code="print(1)")`` after a warm-up, timed
   end to end around the await; p50 and p99.
2. **Cold baselines**: ``python3 -c "print(1)"`` as a plain subprocess, and inside a fresh
   ``bwrap --unshare-all`` sandbox (the usual way to isolate one execution); p50 of each.
   Warm and cold runs are measured in turns (blocks of 20 of each), so that the VM's drift
   during a run weighs on both sides of a ratio alike.
3. **Throughput**: 1000 concurrent ``print(i)`` runs on a 2-worker pool (one per core), vs cold
   bwrap runs two at a time.
4. **Batched tests**: "read two ints, print their sum" against 50 stdin tests: one
   ``pool.run_tests`` request vs 50 SandboxFusion-style ``/run_code`` requests (one
   ``pool.run`` each, sequential, judged by the client), and vs 50 cold bwrap runs.
5. **HTTP**: ``tangram-sandbox serve`` started as a user starts it (a token file, the same
   number of workers), driven by a prebuilt keep-alive client: sequential p50/p99 of
   ``POST /run``, and throughput with many connections; the HTTP p50 over the in-process warm
   p50 of the same run is what HTTP and the server's guard add.

Absolute figures differ 2-3x between machines of the same size, so the targets are ratios
measured in one run (``warm_vs_cold_subprocess_speedup``, ``http_over_api_p50``, ...); the
absolute targets of earlier issues are still reported.

Writes ``tools/bench/results/sandbox.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result
from tqdm import tqdm

from tangram_sandbox.config import default_python
from tangram_sandbox.isolation import capabilities
from tangram_sandbox.models import RunStatus
from tangram_sandbox.pool import SandboxPool

RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = default_python()  # the interpreter the pool runs, so the cold runs match it
BWRAP_ARGS = [
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--tmpfs",
    "/tmp",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
]
SUM_CODE = "a, b = map(int, input().split())\nprint(a + b)\n"
WORKERS = 2  # this machine has 2 cores: one worker per core
TARGETS = {
    "warm_p50_ms": 5.0,  # at most
    "warm_p99_ms": 20.0,  # at most
    "warm_vs_cold_bwrap_speedup": 3.0,  # at least
    "throughput_per_s": 300.0,  # at least, on 2 cores
    "batched_tests_speedup": 5.0,  # at least
    "warm_vs_cold_subprocess_speedup": 5.0,  # at least: a bare `python3 -c`, no isolation
    "http_over_api_p50": 2.0,  # at most: HTTP p50 over the in-process warm p50
}
AT_MOST = {"warm_p50_ms", "warm_p99_ms", "http_over_api_p50"}
HTTP_CLIENTS = 16  # keep-alive connections for the HTTP throughput
BLOCK = 20  # warm and cold latencies are measured in turns of this many runs each


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def find_bwrap() -> str | None:
    """bwrap's path (``make setup`` installs it at /usr/bin/bwrap), or None when absent."""
    if os.access("/usr/bin/bwrap", os.X_OK):
        return "/usr/bin/bwrap"
    return shutil.which("bwrap")


def cold_argv(bwrap: str | None, code: str) -> list[str]:
    """argv of one cold execution of ``code``: plain, or in a fresh bwrap sandbox."""
    argv = [PYTHON, "-c", code]
    return [bwrap, *BWRAP_ARGS, *argv] if bwrap else argv


def cold_once(argv: list[str], stdin: str = "", expected: str = "1\n") -> float:
    """Seconds one cold execution takes, end to end; fails loudly on a wrong result."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or proc.stdout != expected:
        raise RuntimeError(
            f"{argv[0]} exited {proc.returncode} with {proc.stdout!r}: {proc.stderr[-500:]}"
        )
    return elapsed


def cold_throughput(argv: list[str], n: int, parallel: int) -> float:
    """Executions per second with ``parallel`` cold runs in flight at a time."""
    with ThreadPoolExecutor(parallel) as ex:
        t0 = time.perf_counter()
        list(
            tqdm(
                ex.map(lambda _: cold_once(argv), range(n)), total=n, desc="cold tput", leave=False
            )
        )
        return n / (time.perf_counter() - t0)


def sum_tests(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    tests = []
    for _ in range(n):
        a, b = rng.randint(-(10**9), 10**9), rng.randint(-(10**9), 10**9)
        tests.append({"stdin": f"{a} {b}\n", "expected_stdout": f"{a + b}\n"})
    return tests


def cold_tests(bwrap: str, tests: list[dict[str, str]]) -> float:
    """Seconds to check every test with its own cold bwrap run (sequential)."""
    argv = cold_argv(bwrap, SUM_CODE)
    t0 = time.perf_counter()
    for test in tests:
        cold_once(argv, test["stdin"], test["expected_stdout"])
    return time.perf_counter() - t0


async def warm_and_cold_latencies(
    pool: SandboxPool, n: int, warmup: int, bwrap: str | None
) -> dict[str, list[float]]:
    """Sequential latencies of warm runs and of both cold baselines, measured in turns.

    Why in turns (blocks of ``BLOCK`` runs of each, ``n`` of each in all): a VM's speed drifts
    by tens of percent within a minute, and measured one after the other, the ratio of two
    p50s says as much about that drift as about the code. Warm: end-to-end seconds of each
    ``pool.run``, and the run's own ``wall_s`` as the worker reports it (the program's process
    alone), to tell the program's cost from the pool's overhead."""
    for _ in range(warmup):
        await pool.run(code="print(1)")
    plain = cold_argv(None, "print(1)")
    boxed = cold_argv(bwrap, "print(1)") if bwrap else None
    cold_once(plain)  # page cache, dentries
    if boxed:
        cold_once(boxed)
    out: dict[str, list[float]] = {"warm": [], "warm_inner": [], "cold": [], "cold_bwrap": []}
    bar = tqdm(total=n, desc="warm and cold, in turns", leave=False)
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        out["cold"] += [cold_once(plain) for _ in range(size)]
        if boxed:
            out["cold_bwrap"] += [cold_once(boxed) for _ in range(size)]
        for _ in range(size):
            t0 = time.perf_counter()
            result = await pool.run(code="print(1)")
            out["warm"].append(time.perf_counter() - t0)
            out["warm_inner"].append(result.wall_s)
            if result.status is not RunStatus.OK or result.stdout != "1\n":
                raise RuntimeError(f"warm run failed: {result}")
        bar.update(size)
    bar.close()
    return out


async def warm_throughput(pool: SandboxPool, n: int) -> float:
    """Executions per second for ``n`` concurrent ``print(i)`` requests."""
    bar = tqdm(total=n, desc="warm tput", leave=False)

    async def one(i: int) -> str:
        result = await pool.run(code=f"print({i})")
        if i % 50 == 49:
            bar.update(50)
        return result.stdout

    t0 = time.perf_counter()
    outs = await asyncio.gather(*[one(i) for i in range(n)])
    elapsed = time.perf_counter() - t0
    bar.close()
    bad = [i for i, out in enumerate(outs) if out != f"{i}\n"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} concurrent runs printed the wrong thing")
    return n / elapsed


async def batched(
    pool: SandboxPool, tests: list[dict[str, str]], isolation: str = "batch"
) -> float:
    """Seconds for one ``run_tests`` request holding every test (``isolation="batch"``: one
    sandbox for all; ``"per_test"``: a fresh sandbox per test, in the same request)."""
    t0 = time.perf_counter()
    result = await pool.run_tests(code=SUM_CODE, tests=tests, isolation=isolation)
    elapsed = time.perf_counter() - t0
    if result.status is not RunStatus.OK or result.pass_fraction != 1.0:
        raise RuntimeError(f"run_tests: {result.status}, pass fraction {result.pass_fraction}")
    return elapsed


async def per_test_requests(pool: SandboxPool, tests: list[dict[str, str]]) -> float:
    """Seconds for one ``/run_code``-style request per test, sent one after another and judged
    by the client, as a SandboxFusion client checking test by test does."""
    t0 = time.perf_counter()
    passed = 0
    for test in tests:
        result = await pool.run(code=SUM_CODE, stdin=test["stdin"])
        passed += result.status is RunStatus.OK and result.stdout == test["expected_stdout"]
    elapsed = time.perf_counter() - t0
    if passed != len(tests):
        raise RuntimeError(f"per-test requests: {passed}/{len(tests)} passed")
    return elapsed


async def pool_figures(
    n: int, burst: int, tests: list[dict[str, str]], repeats: int, bwrap: str | None
) -> dict[str, Any]:
    async with SandboxPool(min_workers=WORKERS, max_workers=WORKERS) as pool:
        turns = await warm_and_cold_latencies(pool, n, warmup=20, bwrap=bwrap)
        tput = await warm_throughput(pool, burst)
        await batched(pool, tests)  # warm-up of both shapes
        await per_test_requests(pool, tests[:5])
        ours, fresh, sequential, cold = [], [], [], []
        for _ in tqdm(range(repeats), desc="batched tests", leave=False):
            ours.append(await batched(pool, tests))
            fresh.append(await batched(pool, tests, "per_test"))
            sequential.append(await per_test_requests(pool, tests))
            if bwrap:
                cold.append(cold_tests(bwrap, tests))
    return {
        **turns,
        "throughput": tput,
        "batched_s": statistics.median(ours),
        "per_test_isolation_s": statistics.median(fresh),
        "per_test_requests_s": statistics.median(sequential),
        "cold_bwrap_tests_s": statistics.median(cold) if cold else None,
        "replaced_workers": pool.replaced,
    }


def http_figures(n: int, burst: int) -> dict[str, Any]:
    """``tangram-sandbox serve`` as a user starts it: sequential latency and throughput of
    ``POST /run`` through a prebuilt keep-alive client (``http_safety``'s, which costs far
    less than the server, so the figures are the server's)."""
    import http_safety as hs

    body = {"code": "print(1)"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGRAM_API_TOKEN")}
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(hs.TOKEN)
        token_file.chmod(0o600)
        port = hs.free_port()
        cli = [sys.executable, "-m", "tangram_sandbox.cli", "serve", "--port", str(port)]
        cli += ["--workers", str(WORKERS), "--token-file", str(token_file)]
        # One client sends everything here: lift the per-client limits, not the server's.
        cli += ["--client-rate", "1e6", "--client-burst", "1000000"]
        cli += ["--client-concurrency", str(4 * HTTP_CLIENTS)]
        proc = hs.start(cli, env)
        url = f"http://127.0.0.1:{port}/run"
        try:
            hs.wait_healthy(f"http://127.0.0.1:{port}", proc)
            request = hs.raw_request(url, body, hs.TOKEN)

            async def sequential() -> list[float]:
                for _ in range(20):  # warm-up: connection, workers
                    await hs.send(request)
                out = []
                for _ in tqdm(range(n), desc="http", leave=False):
                    t0 = time.perf_counter()
                    status = await hs.send(request)
                    out.append(time.perf_counter() - t0)
                    if status != 200:
                        raise RuntimeError(f"POST /run answered {status}")
                return out

            async def concurrent() -> float:
                left = burst
                statuses: list[int] = []

                async def client() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        statuses.append(await hs.send(request))

                t0 = time.perf_counter()
                await asyncio.gather(*[client() for _ in range(HTTP_CLIENTS)])
                elapsed = time.perf_counter() - t0
                bad = [s for s in statuses if s != 200]
                if bad:
                    raise RuntimeError(f"{len(bad)} of {burst} HTTP requests failed: {bad[:5]}")
                return burst / elapsed

            latencies = hs.run_async(sequential())
            throughput = hs.run_async(concurrent())
        finally:
            hs.stop(proc)
    return {"latencies": latencies, "throughput": throughput}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def result_inner_p50(pool: dict[str, Any]) -> float:
    """p50 in ms of the program's own wall time in the warm runs (as the worker reports it)."""
    return percentile(pool["warm_inner"], 50) * 1e3


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    head = ("measure", "ours", "baseline", "speedup", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    header = "  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()
    return "\n".join([header, "-" * len(header), *lines])


def met(key: str, value: float | None) -> bool:
    if value is None:
        return False
    return value <= TARGETS[key] if key in AT_MOST else value >= TARGETS[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "sandbox.json")
    args = parser.parse_args(argv)
    n = 60 if args.quick else 300
    burst = 300 if args.quick else 1000
    repeats = 2 if args.quick else 5
    tests = sum_tests(50)
    caps = capabilities()
    print(caps.table())
    bwrap = find_bwrap()
    if bwrap is None:
        print("bwrap not found (run `make setup`): cold bwrap figures are recorded as null")

    cold_bw_tput = cold_throughput(cold_argv(bwrap, "print(1)"), n, WORKERS) if bwrap else None
    pool = asyncio.run(pool_figures(n, burst, tests, repeats, bwrap))
    http = http_figures(n, burst)
    cold_sub = pool["cold"]
    cold_bw = pool["cold_bwrap"] or None

    warm_p50 = percentile(pool["warm"], 50) * 1e3
    warm_p99 = percentile(pool["warm"], 99) * 1e3
    cold_sub_p50 = percentile(cold_sub, 50) * 1e3
    cold_bw_p50 = percentile(cold_bw, 50) * 1e3 if cold_bw else None
    cold_bw_p99 = percentile(cold_bw, 99) * 1e3 if cold_bw else None
    vs_bwrap = ratio(cold_bw_p50, warm_p50)
    speedup = ratio(pool["per_test_requests_s"], pool["batched_s"])
    http_p50 = percentile(http["latencies"], 50) * 1e3
    http_p99 = percentile(http["latencies"], 99) * 1e3
    vs_cold_tests = ratio(pool["cold_bwrap_tests_s"], pool["batched_s"])
    figures = {
        "warm_p50_ms": warm_p50,
        "warm_p99_ms": warm_p99,
        "warm_vs_cold_bwrap_speedup": vs_bwrap,
        "throughput_per_s": pool["throughput"],
        "batched_tests_speedup": speedup,
        "warm_vs_cold_subprocess_speedup": ratio(cold_sub_p50, warm_p50),
        "http_over_api_p50": ratio(http_p50, warm_p50),
    }
    targets_met = {key: met(key, value) for key, value in figures.items()}

    ms = ".2f"
    print()
    print(
        table(
            [
                (
                    "warm p50 (ms) vs cold bwrap",
                    fmt(warm_p50, ms),
                    fmt(cold_bw_p50, ms),
                    "x" + fmt(vs_bwrap, ".2f"),
                    "<= 5 ms, >= x3",
                ),
                (
                    "warm p50 (ms) vs cold subprocess",
                    fmt(warm_p50, ms),
                    fmt(cold_sub_p50, ms),
                    "x" + fmt(ratio(cold_sub_p50, warm_p50), ".2f"),
                    ">= x5",
                ),
                (
                    "HTTP p50 (ms) vs in-process warm p50",
                    fmt(http_p50, ms),
                    fmt(warm_p50, ms),
                    "x" + fmt(ratio(http_p50, warm_p50), ".2f") + " (cost)",
                    "<= x2",
                ),
                (
                    f"HTTP exec/s, {HTTP_CLIENTS} conns vs in-process",
                    fmt(http["throughput"], ".0f"),
                    fmt(pool["throughput"], ".0f"),
                    "x" + fmt(ratio(http["throughput"], pool["throughput"]), ".2f"),
                    "",
                ),
                (
                    "warm p99 (ms) vs cold bwrap",
                    fmt(warm_p99, ms),
                    fmt(cold_bw_p99, ms),
                    "x" + fmt(ratio(cold_bw_p99, warm_p99), ".2f"),
                    "<= 20 ms",
                ),
                (
                    f"exec/s, {WORKERS} workers vs {WORKERS} cold bwrap",
                    fmt(pool["throughput"], ".0f"),
                    fmt(cold_bw_tput, ".0f"),
                    "x" + fmt(ratio(pool["throughput"], cold_bw_tput), ".2f"),
                    ">= 300/s",
                ),
                (
                    "50 tests (ms): run_tests vs 50 run()",
                    fmt(pool["batched_s"] * 1e3, ".1f"),
                    fmt(pool["per_test_requests_s"] * 1e3, ".1f"),
                    "x" + fmt(speedup, ".2f"),
                    ">= x5",
                ),
                (
                    "50 tests (ms): run_tests per_test isolation vs 50 run()",
                    fmt(pool["per_test_isolation_s"] * 1e3, ".1f"),
                    fmt(pool["per_test_requests_s"] * 1e3, ".1f"),
                    "x"
                    + fmt(ratio(pool["per_test_requests_s"], pool["per_test_isolation_s"]), ".2f"),
                    "",
                ),
                (
                    "50 tests (ms): run_tests vs 50 cold bwrap",
                    fmt(pool["batched_s"] * 1e3, ".1f"),
                    fmt(ms_or_none(pool["cold_bwrap_tests_s"]), ".1f"),
                    "x" + fmt(vs_cold_tests, ".2f"),
                    "",
                ),
            ]
        )
    )
    print()
    print(
        f"warm run: the program's own process took {result_inner_p50(pool):.2f} ms (p50) "
        f"of the {warm_p50:.2f} ms end to end"
    )
    print(
        "targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets_met.items())
    )

    result = {
        "benchmark": "sandbox",
        "quick": args.quick,
        **figures,
        "cold_subprocess_p50_ms": cold_sub_p50,
        "cold_bwrap_p50_ms": cold_bw_p50,
        "cold_bwrap_p99_ms": cold_bw_p99,
        "http_p50_ms": http_p50,
        "http_p99_ms": http_p99,
        "http_throughput_per_s": http["throughput"],
        "http_clients": HTTP_CLIENTS,
        "warm_program_wall_p50_ms": result_inner_p50(pool),
        "warm_program_wall_note": "the run's wall_s as the worker reports it: from the "
        "program's start to its process's end (the set-up before it is not counted); "
        "warm_p50_ms minus this is the sandbox's and the pool's own overhead",
        "cold_bwrap_throughput_per_s": cold_bw_tput,
        "batched_tests": {
            "tests": len(tests),
            "repeats": repeats,
            "run_tests_ms": pool["batched_s"] * 1e3,
            "run_tests_per_test_isolation_ms": pool["per_test_isolation_s"] * 1e3,
            "per_test_isolation_speedup": ratio(
                pool["per_test_requests_s"], pool["per_test_isolation_s"]
            ),
            "per_test_requests_ms": pool["per_test_requests_s"] * 1e3,
            "cold_bwrap_ms": ms_or_none(pool["cold_bwrap_tests_s"]),
            "speedup_vs_cold_bwrap": vs_cold_tests,
        },
        "sizes": {
            "warm_and_cold_runs": n,
            "measured_in_turns_of": BLOCK,
            "warmup": 20,
            "burst": burst,
            "workers": WORKERS,
        },
        "bwrap": bwrap,
        "bwrap_note": None
        if bwrap
        else "bwrap not found (`make setup` installs it): cold bwrap figures are null",
        "replaced_workers": pool["replaced_workers"],
        "targets": {
            "warm_p50_ms": {"at_most": TARGETS["warm_p50_ms"]},
            "warm_p99_ms": {"at_most": TARGETS["warm_p99_ms"]},
            "warm_vs_cold_bwrap_speedup": {"at_least": TARGETS["warm_vs_cold_bwrap_speedup"]},
            "throughput_per_s": {"at_least": TARGETS["throughput_per_s"], "cores": WORKERS},
            "batched_tests_speedup": {"at_least": TARGETS["batched_tests_speedup"]},
            "warm_vs_cold_subprocess_speedup": {
                "at_least": TARGETS["warm_vs_cold_subprocess_speedup"]
            },
            "http_over_api_p50": {"at_most": TARGETS["http_over_api_p50"]},
        },
        "targets_met": targets_met,
        "capabilities": caps.model_dump(),
        "versions": machine_info("tangram-sandbox", "tangram-core"),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
