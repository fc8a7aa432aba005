#!/usr/bin/env python3
"""HTTP safety of Tangram's servers, measured: fuzz, authentication, overload and recovery.

Servers, each on loopback:

* **sandbox, ours**: ``tangram-sandbox serve`` as a user starts it (CLI defaults, a token from
  a 600 file), in its own process, on a real pool;
* **sandbox, baseline**: the same FastAPI app and pool without :class:`HttpGuard` (no token,
  no limits): what the server was before this work;
* **reward-serve, ours**: ``tangram-reward serve`` as a user starts it (a token from a 600
  file), in its own process: its HTTP gateway in front of a rule verifier on a real local Ray
  Serve.

Measured on each of ours:

1. **fuzz**: hostile bodies from the test suites' hypothesis strategies (``--fuzz-examples``
   per schema, derandomized); ``server_errors`` counts 5xx answers.
2. **unauthenticated**: requests with no token or a wrong one on every route;
   ``unauthenticated_accepted`` counts any answer other than 401.
3. **capacity**: a closed loop of valid requests for ``--capacity-s`` seconds.
4. **overload**: an open loop at twice the capacity for ``--overload-s`` seconds, from 32
   client addresses, generated in a process of its own by a lean keep-alive client; each
   request has a ``--deadline-s`` deadline. ``unanswered`` counts requests with no HTTP
   answer within it (timeouts, dropped connections).
5. **recovery**: after the load stops, one probe every 50 ms; ``recovery_seconds`` is the time
   until three probes in a row answer 200 within twice the idle median latency (+20 ms).

The sandbox baseline goes through 3-5 at its own capacity, for the ratio.

Writes ``tools/bench/results/http_safety.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-token-" + os.urandom(12).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The load comes from many clients (loopback addresses), as on a cluster; the probes from
# 127.0.0.1, a client of their own.
CLIENTS = [f"127.0.2.{i}" for i in range(1, 33)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_module(path: Path, name: str) -> Any:
    """A test module, for its hypothesis strategies (one definition of a hostile body)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


# --- measurements ----------------------------------------------------------------------------


def fuzz(url: str, strategy: Any, examples: int, headers: dict[str, str]) -> Counter[int]:
    import httpx
    from hypothesis import HealthCheck, given, settings

    seen: Counter[int] = Counter()
    with httpx.Client(timeout=60, headers=headers) as c:

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=strategy)
        def run(body: bytes) -> None:
            resp = c.post(url, content=body, headers={"content-type": "application/json"})
            seen[resp.status_code] += 1

        run()
    return seen


def unauthenticated(urls: list[tuple[str, str]], body: dict[str, Any]) -> Counter[int]:
    """Each route with no token, a wrong one, a token without 'Bearer', and a prefix of ours."""
    import httpx

    wrong = [
        {},
        {"Authorization": "Bearer wrong-token-000000000000"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ]
    seen: Counter[int] = Counter()
    for method, url in urls:
        for headers in wrong:
            resp = httpx.request(method, url, json=body, headers=headers, timeout=30)
            seen[resp.status_code] += 1
    return seen


def raw_request(url: str, body: dict[str, Any], token: str) -> tuple[str, int, bytes]:
    """A prebuilt keep-alive ``POST``: the load generator must cost far less than the server,
    and a general client (httpx) spends milliseconds per request managing its pool."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    data = json.dumps(body).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return str(parts.hostname), int(parts.port or 80), head.encode() + data


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_IDLE: dict[tuple[str | None, str, int], list[Conn]] = {}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status code, and whether the connection may be reused (HTTP/1.1, any framing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


def run_async(coro: Any) -> Any:
    """``asyncio.run`` for the raw client: kept-alive connections live in one loop only."""

    async def scoped() -> Any:
        try:
            return await coro
        finally:
            for conns in _IDLE.values():
                for _, writer in conns:
                    writer.close()
            _IDLE.clear()

    return asyncio.run(scoped())


async def send(request: tuple[str, int, bytes], source: str | None = None) -> int:
    """Send a :func:`raw_request` (from loopback address ``source``) on a kept-alive
    connection when one is idle; the status code."""
    host, port, payload = request
    idle = _IDLE.setdefault((source, host, port), [])
    reused = bool(idle)
    if reused:
        reader, writer = idle.pop()
    else:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        writer.write(payload)
        await writer.drain()
        status, reusable = await _read_response(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        writer.close()
        if reused and not getattr(exc, "partial", b""):
            # The server closed this idle connection as we reused it (keep-alive timeout):
            # nothing was answered, so send again on a fresh one, as HTTP clients do.
            idle.clear()
            return await send(request, source)
        raise
    except BaseException:
        writer.close()
        raise
    if reusable:
        idle.append((reader, writer))
    else:
        writer.close()
    return status


async def closed_loop(url: str, body: dict[str, Any], clients: int, seconds: float) -> float:
    """Requests per second answered 200 with ``clients`` always waiting on one each."""
    request = raw_request(url, body, TOKEN)
    done = 0
    stop = time.monotonic() + seconds

    async def worker(source: str) -> None:
        nonlocal done
        while time.monotonic() < stop:
            if await send(request, source) == 200:
                done += 1
            else:  # turned away: back off a little instead of spinning on 503s
                await asyncio.sleep(0.02)

    t0 = time.monotonic()
    await asyncio.gather(*[worker(CLIENTS[i % len(CLIENTS)]) for i in range(clients)])
    return done / (time.monotonic() - t0)


async def idle_latency(url: str, body: dict[str, Any], n: int = 30) -> float:
    request = raw_request(url, body, TOKEN)
    lat = []
    for _ in range(n):
        t0 = time.monotonic()
        assert await send(request) == 200
        lat.append(time.monotonic() - t0)
    return statistics.median(lat)


async def open_loop(
    url: str, body: dict[str, Any], rate: float, seconds: float, deadline: float, token: str
) -> dict[str, Any]:
    """Send at ``rate`` requests/s for ``seconds``, each with its own ``deadline``."""
    request = raw_request(url, body, token)
    outcomes: Counter[str] = Counter()

    async def one(source: str) -> None:
        try:
            outcomes[str(await asyncio.wait_for(send(request, source), deadline))] += 1
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            outcomes[f"unanswered:{type(exc).__name__}"] += 1

    tasks = []
    t0 = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate) + 1
        tasks += [asyncio.ensure_future(one(CLIENTS[i % len(CLIENTS)])) for i in range(sent, due)]
        sent = due
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    return {"requests": sent, "outcomes": dict(outcomes)}


def generate(*args: Any) -> dict[str, Any]:
    """:func:`open_loop` in its own process, so that the load and the probes do not share
    one event loop (a busy generator would delay the probes' own measurements)."""
    return dict(run_async(open_loop(*args)))


async def probe(url: str, body: dict[str, Any]) -> tuple[bool, float]:
    t0 = time.monotonic()
    try:
        status = await asyncio.wait_for(send(raw_request(url, body, TOKEN)), 10)
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
        status = 0
    return status == 200, time.monotonic() - t0


def overload(
    url: str, body: dict[str, Any], rate: float, seconds: float, deadline: float, normal_s: float
) -> dict[str, Any]:
    """Load from another process; probe during it and after it until latency is normal."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pool.submit(int, 0).result()  # the process is up before the clock starts
        future = pool.submit(generate, url, body, rate, seconds, deadline, TOKEN)
        t0 = time.monotonic()
        during: list[float] = []
        while time.monotonic() - t0 < seconds:
            ok, lat = run_async(probe(url, body))
            if ok:
                during.append(lat)
            time.sleep(0.2)
        stopped = t0 + seconds
        limit = 2 * normal_s + 0.02
        recovered: float | None = None
        good = 0
        while time.monotonic() - stopped < 60:
            p0 = time.monotonic()
            ok, lat = run_async(probe(url, body))
            good = good + 1 if ok and lat <= limit else 0
            if good == 3:
                recovered = max(0.0, p0 - stopped)
                break
            time.sleep(0.05)
        load = future.result()
    outcomes = load["outcomes"]
    unanswered = sum(v for k, v in outcomes.items() if k.startswith("unanswered"))
    return {
        "rate_rps": round(rate, 1),
        "seconds": seconds,
        "deadline_s": deadline,
        "requests": load["requests"],
        "outcomes": dict(sorted(outcomes.items())),
        "unanswered": unanswered,
        "server_errors_other_than_503": sum(
            v for k, v in outcomes.items() if k.startswith("5") and k != "503"
        ),
        "probe_median_during_load_s": round(statistics.median(during), 4) if during else None,
        "recovery_seconds": None if recovered is None else round(recovered, 3),
    }


def load_run(url: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    normal = run_async(idle_latency(url, body))
    capacity = run_async(closed_loop(url, body, args.clients, args.capacity_s))
    print(f"  capacity {capacity:.1f} req/s, idle median latency {normal * 1000:.1f} ms")
    run = overload(url, body, 2 * capacity, args.overload_s, args.deadline_s, normal)
    print(
        f"  overload: {run['requests']} requests at {run['rate_rps']} req/s: {run['outcomes']}, "
        f"probe median during load {run['probe_median_during_load_s']} s, "
        f"recovered in {run['recovery_seconds']} s"
    )
    return {"capacity_rps": round(capacity, 1), "idle_median_s": round(normal, 4), **run}


# --- servers ---------------------------------------------------------------------------------


def serve_baseline(port: int) -> None:
    """The sandbox app as it was before the guard: no token, no limits (runs in a subprocess)."""
    import uvicorn

    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.server import build_app

    app = build_app(config=PoolConfig(min_workers=2, max_workers=2))
    app.user_middleware.clear()  # drop HttpGuard: the unguarded baseline
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def sandbox(args: argparse.Namespace) -> dict[str, Any]:
    tests = load_module(ROOT / "packages/sandbox/tests/test_http_safety.py", "sandbox_http_tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGRAM_API_TOKEN")}
    body = {"code": "print(sum(range(1000)))"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        port = free_port()
        cli = [sys.executable, "-m", "tangram_sandbox.cli", "serve", "--port", str(port)]
        # CLI defaults, except: the per-client rate, which the fuzz (one client) would exceed,
        # and the request limits the fuzz strategies were written against.
        cli += ["--workers", "2", "--token-file", str(token_file)]
        cli += ["--client-rate", "1e6", "--client-burst", "1000000"]
        cli += ["--max-body-bytes", str(tests.MAX_BODY)]
        cli += ["--max-code-chars", str(tests.API.max_code_chars)]
        cli += ["--max-tests", str(tests.API.max_tests)]
        proc = start(cli, env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            print("sandbox, ours (tangram-sandbox serve)")
            fuzzed: dict[str, Any] = {}
            for path in sorted(tests.VALID):
                seen = fuzz(url + path, tests.hostile_bodies(path), args.fuzz_examples, AUTH)
                fuzzed[path] = dict(sorted(seen.items()))
                print(f"  fuzz {path}: {fuzzed[path]}")
            out["fuzz"] = fuzzed
            routes = [("POST", url + p) for p in ("/run", "/run_tests", "/run_code")]
            routes.append(("GET", url + "/capabilities"))
            unauth = unauthenticated(routes, body)
            out["unauthenticated"] = dict(unauth)
            print(f"  unauthenticated: {dict(unauth)}")
            out["ours"] = load_run(url + "/run", body, args)
        finally:
            stop(proc)
    port = free_port()
    proc = start([sys.executable, __file__, "--serve-baseline", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        print("sandbox, baseline (no guard)")
        out["baseline"] = load_run(url + "/run", body, args)
    finally:
        stop(proc)
    return out


def reward(args: argparse.Namespace) -> dict[str, Any]:
    tests = load_module(ROOT / "packages/reward-serve/tests/test_http_safety.py", "reward_tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGRAM_API_TOKEN")}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        port = free_port()
        # Defaults, except: the per-client rate, which the fuzz (one client) would exceed, the
        # body limit the fuzz strategies were written against, and the Serve queue sized for
        # the load (about throughput x deadline / 4: Serve's default of 128 outlived a 15 s
        # deadline when a loaded 2-core machine served ~20 requests/s).
        deployment = {
            "name": "guarded",
            "kind": "rules",
            "num_cpus": 0.5,
            "max_queued_requests": args.reward_queue,
            "http": {"max_body_bytes": tests.MAX_BODY, "client_rate": 1e6, "client_burst": 10**6},
        }
        config = Path(tmp) / "rewards.yaml"
        config.write_text(json.dumps({"http_port": port, "deployments": [deployment]}))
        cli = [sys.executable, "-m", "tangram_reward.cli", "serve", str(config)]
        proc = start([*cli, "--token-file", str(token_file)], env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, timeout=300)
            url += "/guarded"
            print("reward-serve, ours (tangram-reward serve: the gateway and a rule verifier)")
            seen = fuzz(url, tests.hostile_bodies("/guarded"), args.fuzz_examples, AUTH)
            out["fuzz"] = {"/guarded": dict(sorted(seen.items()))}
            print(f"  fuzz /guarded: {out['fuzz']['/guarded']}")
            unauth = unauthenticated([("POST", url)], tests.GOOD)
            out["unauthenticated"] = dict(unauth)
            print(f"  unauthenticated: {dict(unauth)}")
            out["ours"] = load_run(url, tests.GOOD, args)
        finally:
            stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-examples", type=int, default=1000, help="per schema")
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--deadline-s", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--skip-reward", action="store_true")
    parser.add_argument("--skip-sandbox", action="store_true")
    parser.add_argument("--reward-queue", type=int, default=32, help="max_queued_requests")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_safety.json")
    parser.add_argument("--serve-baseline", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return
    load_before = os.getloadavg()
    servers: dict[str, Any] = {}
    if not args.skip_sandbox:
        servers["sandbox"] = sandbox(args)
    if not args.skip_reward:
        servers["reward_serve"] = reward(args)
    if args.skip_sandbox or args.skip_reward:
        print(servers)
        return  # a partial run: printed, not recorded
    ours: Callable[[str], list[Any]] = lambda key: [s["ours"][key] for s in servers.values()]  # noqa: E731
    fuzz_counts = [c for s in servers.values() for seen in s["fuzz"].values() for c in seen.items()]
    base = servers["sandbox"]["baseline"]
    ours_sb = servers["sandbox"]["ours"]
    result = {
        "fuzz_cases": sum(n for _, n in fuzz_counts),
        "server_errors": sum(n for code, n in fuzz_counts if int(code) >= 500),
        "unauthenticated_accepted": sum(
            n for s in servers.values() for code, n in s["unauthenticated"].items() if code != 401
        ),
        "overload_requests": sum(ours("requests")),
        "overload_unanswered": sum(ours("unanswered")),
        "recovery_seconds": max(
            (r for r in ours("recovery_seconds") if r is not None), default=None
        ),
        "recovered": all(r is not None for r in ours("recovery_seconds")),
        "baseline_sandbox_unanswered": base["unanswered"],
        "baseline_sandbox_recovery_seconds": base["recovery_seconds"],
        "servers": servers,
        # The machine is shared: its load says how much of the CPU the servers really had.
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "settings": vars(args) | {"out": str(args.out)},
        "versions": machine_info(
            "tangram-core",
            "tangram-sandbox",
            "tangram-reward-serve",
            "ray",
            "uvicorn",
            "fastapi",
            "hypothesis",
        ),
    }
    print(
        f"fuzz: {result['fuzz_cases']} cases, {result['server_errors']} 5xx; "
        f"unauthenticated accepted: {result['unauthenticated_accepted']}"
    )
    print(
        f"sandbox overload at 2x capacity: unanswered {ours_sb['unanswered']} "
        f"(baseline {base['unanswered']}), recovery {ours_sb['recovery_seconds']} s "
        f"(baseline {base['recovery_seconds']} s)"
    )
    if base["unanswered"] and ours_sb["requests"]:
        frac = lambda r: r["unanswered"] / max(1, r["requests"])  # noqa: E731
        print(f"unanswered fraction, baseline / ours: {frac(base):.3f} / {frac(ours_sb):.3f}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
