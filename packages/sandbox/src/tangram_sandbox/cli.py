"""``tangram-sandbox``: print the isolation this host allows, serve the HTTP API, run a file.

Bad arguments (a missing file, a negative count) and a missing optional dependency exit with
status 2 and a message naming the argument or the extra to install, never a traceback.
``serve`` and ``run`` set up OpenTelemetry from the ``OTEL_*`` variables
(``OTEL_TRACES_EXPORTER=console`` prints each execution's span).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tangram_core.telemetry import TelemetryConfigError, TelemetryHandle
from tangram_sandbox.languages import LANGUAGES

__all__ = ["main"]


class MissingExtraError(ImportError):
    """A command needs an optional dependency that is not installed; the message says which
    extra installs it."""


def require_extra(modules: tuple[str, ...], extra: str, purpose: str) -> None:
    """Import each of ``modules`` or raise :class:`MissingExtraError` naming the extra, before
    anything starts (a pool, a socket)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(
                f"{purpose} needs {module}, which is not installed ({exc}); "
                f"install it with: pip install 'tangram-sandbox[{extra}]'"
            ) from None


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``. argparse names the option in its error, so a
    bad ``--workers`` is blamed on ``--workers``, not on a setting derived from it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _capabilities(args: argparse.Namespace) -> int:
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.isolation import capabilities
    from tangram_sandbox.languages import table

    caps = capabilities()
    print(caps.model_dump_json(indent=2) if args.json else caps.table())
    if not args.json:
        print(table(PoolConfig()))
    return 1 if args.strict and caps.missing() else 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    require_extra(("fastapi", "uvicorn"), "server", "tangram-sandbox serve")
    import uvicorn

    from tangram_core.http.guard import GuardConfig, TokenError, check_bind, load_token
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.models import Limits
    from tangram_sandbox.server import ApiLimits, build_app, parse_networks

    if args.max_workers is not None and args.max_workers < args.workers:
        print(
            f"tangram-sandbox serve: --max-workers ({args.max_workers}) must be >= --workers "
            f"({args.workers}); raise --max-workers or lower --workers",
            file=sys.stderr,
        )
        return 2
    max_workers = args.max_workers if args.max_workers is not None else max(args.workers, 1)
    in_flight = args.max_in_flight or 4 * max_workers
    max_queue = args.max_queue if args.max_queue is not None else 4 * in_flight
    try:
        token = load_token(args.token_file)
        check_bind(args.host, token, service="tangram-sandbox")
        networks = parse_networks(
            part for value in args.allow_network for part in value.split(",") if part.strip()
        )
        guard = GuardConfig(
            max_body_bytes=args.max_body_bytes,
            max_in_flight=in_flight,
            max_queue=max_queue,
            queue_timeout_s=args.queue_timeout_s,
            client_concurrency=args.client_concurrency,
            client_rate=args.client_rate,
            client_burst=args.client_burst,
        )
        api = ApiLimits(
            max_code_chars=args.max_code_chars,
            max_tests=args.max_tests,
            max_output_bytes=args.max_output_bytes,
        )
        max_limits = Limits(wall_s=args.max_wall_s, memory_mb=args.max_memory_mb, processes=512)
        config = PoolConfig(
            min_workers=args.workers,
            max_workers=max_workers,
            max_limits=max_limits,
            max_queue=max_queue,
        )
    except ValueError as exc:  # TokenError, InsecureBindError and pydantic's errors
        kind = "token" if isinstance(exc, TokenError) else "configuration"
        print(f"tangram-sandbox serve: {kind} error: {exc}", file=sys.stderr)
        return 2
    telemetry = _telemetry()
    log = logging.getLogger("tangram_sandbox")
    if token is None:
        log.warning(
            "serving on %s without a token: any local user can run code here; set "
            "TANGRAM_API_TOKEN or pass --token-file to require one",
            args.host,
        )
        if networks:
            log.warning("--allow-network has no effect without a token: every route is open here")
    for network in networks:
        if not network.is_private:
            log.warning("--allow-network %s is not a private network", network)
    app = build_app(config=config, token=token, guard=guard, api=api, allow_networks=networks)
    # Shutdown drains: uvicorn stops accepting, waits for in-flight requests (each bounded
    # by the clamped wall limit plus the queue wait), then the pool drains its workers.
    drain_s = int(args.max_wall_s + args.queue_timeout_s + config.grace_s)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=drain_s,
        limit_concurrency=in_flight + max_queue + 64,
        # Clients are told apart (and allowed in by network) by their peer address only: an
        # X-Forwarded-For header from a local process must not pick another address.
        proxy_headers=False,
    )
    telemetry.shutdown()
    return 0


def _telemetry() -> TelemetryHandle:
    """OpenTelemetry from the ``OTEL_*`` variables (no-op when none is set); a bad value is a
    :class:`TelemetryConfigError` naming the variable, which :func:`main` answers with exit
    status 2."""
    from tangram_core.telemetry import configure_telemetry

    return configure_telemetry(service_name="tangram-sandbox")


def _run(args: argparse.Namespace) -> int:
    from tangram_sandbox.languages import EXTENSIONS
    from tangram_sandbox.models import RunStatus
    from tangram_sandbox.pool import SandboxPool

    path = Path(args.file)
    language = args.language or EXTENSIONS.get(path.suffix, "python")
    try:
        code = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"tangram-sandbox run: cannot read FILE {str(path)!r}: {reason}", file=sys.stderr)
        return 2
    telemetry = _telemetry()

    async def go() -> int:
        async with SandboxPool(min_workers=1, max_workers=1) as pool:
            result = await pool.run(code=code, language=language, stdin=sys.stdin.read())
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        summary = result.model_dump(exclude={"stdout", "stderr", "files"})
        print(json.dumps(summary, default=str), file=sys.stderr)
        return 0 if result.status is RunStatus.OK else 1

    try:
        return asyncio.run(go())
    finally:
        telemetry.shutdown()  # flushes the spans before the process exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tangram-sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    caps = sub.add_parser("capabilities", help="probe and print the isolation layers")
    caps.add_argument("--json", action="store_true")
    caps.add_argument("--strict", action="store_true", help="exit 1 when a layer is missing")
    caps.set_defaults(func=_capabilities)
    serve = sub.add_parser("serve", help="serve /run, /run_tests and SandboxFusion's /run_code")
    serve.add_argument(
        "--host", default="127.0.0.1", help="bind address; beyond loopback needs a token"
    )
    serve.add_argument("--port", type=_at_least(0), default=8080)
    serve.add_argument("--workers", type=_at_least(0), default=2, help="warm workers")
    serve.add_argument(
        "--max-workers", type=_at_least(1), default=None, help="default: --workers (at least 1)"
    )
    serve.add_argument(
        "--token-file",
        default=None,
        help="file (mode 600) holding the bearer token; else $TANGRAM_API_TOKEN or "
        "$TANGRAM_API_TOKEN_FILE. There is no option for the token itself (ps shows it).",
    )
    serve.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="clients in this network (e.g. 10.0.0.0/8; repeat, or separate with commas) may "
        "call SandboxFusion's /run_code without the token, as verl does; every other route and "
        "client still needs it. Default: none",
    )
    limits = serve.add_argument_group(
        "limits (over a limit: 413, 422, 429 or 503; 504 on SandboxFusion's /run_code)"
    )
    limits.add_argument("--max-body-bytes", type=_at_least(1), default=8 << 20)
    limits.add_argument("--max-code-chars", type=_at_least(1), default=1 << 20)
    limits.add_argument(
        "--max-tests", type=_at_least(1), default=1000, help="test cases per request"
    )
    limits.add_argument(
        "--max-output-bytes", type=_at_least(0), default=1 << 20, help="stdout/stderr kept per run"
    )
    limits.add_argument("--max-wall-s", type=_positive, default=600, help="request limits clamp")
    limits.add_argument(
        "--max-memory-mb", type=_at_least(1), default=8192, help="request limits clamp"
    )
    limits.add_argument(
        "--max-in-flight",
        type=_at_least(1),
        default=None,
        help="requests running at once (default: 4 x max workers); the rest queue",
    )
    limits.add_argument(
        "--max-queue",
        type=_at_least(0),
        default=None,
        help="requests waiting (default: 4 x max in flight); past it, 503 at once",
    )
    limits.add_argument("--queue-timeout-s", type=_positive, default=10.0, help="then 503")
    limits.add_argument("--client-concurrency", type=_at_least(1), default=32, help="then 429")
    limits.add_argument("--client-rate", type=_positive, default=200.0, help="requests/s; then 429")
    limits.add_argument("--client-burst", type=_at_least(1), default=400)
    serve.set_defaults(func=_serve)
    run = sub.add_parser("run", help="run one file in a sandbox (stdin from ours)")
    run.add_argument("file")
    run.add_argument("--language", choices=LANGUAGES)
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)  # a bad argument: argparse names it and exits 2
    try:
        code: int = args.func(args)
    except (MissingExtraError, TelemetryConfigError) as exc:
        print(f"tangram-sandbox {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
