"""A real :class:`SandboxPool` in a process of its own, driven over stdin and stdout.

Why a separate process: rootless mode means the pool itself runs as an unprivileged uid, so
``test_rootless.py`` (root, to watch the host) starts this script under that uid with
``setpriv``. One JSON object per line each way; requests run concurrently, and each answer
carries its request's ``id``:

- ``{"id": 1, "op": "run", "request": {...}}``: ``{"id": 1, "result": RunResult}``, or
  ``{"id": 1, "cancelled": true}`` once a ``cancel`` reached it;
- ``{"id": 2, "op": "cancel", "target": 1}``: cancels run 1 (as a client that went away);
- ``{"id": 3, "op": "state"}``: the pool's workers, replacements, leases and config;
- ``{"id": 4, "op": "close", "drain": false}``: closes the pool, answers, then exits.

The first line out is ``{"ready": true, ...state}``. Argument: the pool's settings (JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from tangram_sandbox.config import PoolConfig
from tangram_sandbox.pool import SandboxPool


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _state(pool: SandboxPool) -> dict[str, Any]:
    held = pool._leases.held if pool._leases is not None else {}
    return {
        "pid": os.getpid(),
        "workers": sorted(w.pid for w in pool._workers),
        "replaced": pool.replaced,
        "size": pool.size,
        "target": pool.target,
        "leases": sorted(held),
        "lock_dir": pool.config.lock_dir,
        "cache_dir": pool.config.cache_dir,
    }


async def _run(pool: SandboxPool, ident: int, request: dict[str, Any]) -> None:
    try:
        result = await pool.run(**request)
    except asyncio.CancelledError:
        _reply({"id": ident, "cancelled": True})
        return
    except Exception as exc:  # the test shows it: an exception here is a finding
        _reply({"id": ident, "error": repr(exc)})
        return
    _reply({"id": ident, "result": result.model_dump(mode="json")})


async def main() -> None:
    config = PoolConfig(**json.loads(sys.argv[1]))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    running: dict[int, asyncio.Task[None]] = {}
    async with SandboxPool(config) as pool:
        _reply({"ready": True, **_state(pool)})
        while line := await reader.readline():
            msg = json.loads(line)
            ident, op = msg["id"], msg["op"]
            if op == "run":
                running[ident] = asyncio.create_task(_run(pool, ident, msg["request"]))
            elif op == "cancel":
                running[msg["target"]].cancel()
                _reply({"id": ident, "ok": True})
            elif op == "state":
                _reply({"id": ident, **_state(pool)})
            elif op == "close":
                await pool.close(drain=msg.get("drain", True))
                _reply({"id": ident, "ok": True})
                return


if __name__ == "__main__":
    asyncio.run(main())
