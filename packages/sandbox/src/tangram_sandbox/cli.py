"""``tangram-sandbox``: print the isolation this host allows, serve the HTTP API, run a file."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _capabilities(args: argparse.Namespace) -> int:
    from tangram_sandbox.isolation import capabilities

    caps = capabilities()
    print(caps.model_dump_json(indent=2) if args.json else caps.table())
    return 1 if args.strict and caps.missing() else 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.server import build_app

    config = PoolConfig(
        min_workers=args.workers, max_workers=max(args.workers, args.max_workers or 0)
    )
    uvicorn.run(build_app(config=config), host=args.host, port=args.port, log_level="info")
    return 0


def _run(args: argparse.Namespace) -> int:
    from tangram_sandbox.models import RunStatus
    from tangram_sandbox.pool import SandboxPool

    path = Path(args.file)
    language = args.language or {".py": "python", ".cpp": "cpp", ".sh": "bash"}.get(
        path.suffix, "python"
    )

    async def go() -> int:
        async with SandboxPool(min_workers=1, max_workers=1) as pool:
            result = await pool.run(
                code=path.read_text(), language=language, stdin=sys.stdin.read()
            )
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        summary = result.model_dump(exclude={"stdout", "stderr", "files"})
        print(json.dumps(summary, default=str), file=sys.stderr)
        return 0 if result.status is RunStatus.OK else 1

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tangram-sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    caps = sub.add_parser("capabilities", help="probe and print the isolation layers")
    caps.add_argument("--json", action="store_true")
    caps.add_argument("--strict", action="store_true", help="exit 1 when a layer is missing")
    caps.set_defaults(func=_capabilities)
    serve = sub.add_parser("serve", help="serve /run, /run_tests and SandboxFusion's /run_code")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2, help="warm workers")
    serve.add_argument("--max-workers", type=int, default=None)
    serve.set_defaults(func=_serve)
    run = sub.add_parser("run", help="run one file in a sandbox (stdin from ours)")
    run.add_argument("file")
    run.add_argument("--language", choices=["python", "cpp", "bash"])
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
