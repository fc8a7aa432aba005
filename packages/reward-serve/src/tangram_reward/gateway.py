"""Reward-serve's HTTP front door: one guarded ASGI app that forwards through Serve handles.

Why not Serve's own HTTP proxy: under overload the proxy routed every request, the ones a
limit would refuse included, to a replica before the guard there could answer, so on two
cores at twice capacity it spent its CPU relaying refusals: 24 of 480 requests per second got
a 200 (capacity 240), 13 of 14,381 requests had no answer within 15 s, and its backlog took
5.9 s to drain. Here :class:`~tangram_core.http.guard.HttpGuard` answers 401/413/429/503 before
anything leaves this process, a body is validated against its pydantic schema (422 naming the
field) before it reaches a replica, and only admitted requests become handle calls.

One route per deployment, ``POST /<name>``, each behind its own guard (the deployment's
``http`` limits). Past a deployment's ``max_queued_requests`` the handle raises
``BackPressureError``, answered 503 with ``Retry-After`` at once; a request with no result
within ``request_timeout_s`` is cancelled on its replica and answered 504. A client that
disconnects cancels its request on the replica too. ``GET /healthz`` needs no token and does
no work. Every answer is JSON; inputs are never echoed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr, ValidationError

from tangram_core.http.guard import (
    ASGIApp,
    GuardConfig,
    GuardStats,
    HttpGuard,
    Receive,
    Scope,
    Send,
    send_json,
)
from tangram_reward.deployment_config import RewardDeploymentConfig
from tangram_reward.models.judge_parse import JudgeParseError
from tangram_reward.rules.request import RuleRequest
from tangram_reward.schemas import ScoreRequest, validation_errors

__all__ = [
    "HttpStatusError",
    "RewardGateway",
    "bind",
    "json_endpoint",
    "run_in_thread",
    "uvicorn_server",
]

JsonHandler = Callable[[dict[str, Any], dict[str, str]], Awaitable[Any]]


class HttpStatusError(Exception):
    """Raised by a JSON handler to answer ``status`` with ``detail`` (and no traceback)."""

    def __init__(self, status: int, detail: Any, retry_after_s: int | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


def json_endpoint(handler: JsonHandler) -> ASGIApp:
    """An ASGI app: ``POST`` a JSON object, get ``handler(body, headers)`` back as JSON.

    Errors are the client's and say so: 405 for another method, 400 for a body that is not
    UTF-8 JSON (or nests too deep to parse), 422 with the field and the rule for a body that
    does not validate. ``headers`` are lower-cased."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await send_json(send, 405, {"detail": "use POST with a JSON object body"})
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, or absurd nesting
            await send_json(send, 400, {"detail": "body is not valid JSON (UTF-8)"})
            return
        if not isinstance(data, dict):
            detail = [{"field": "", "error": "the body must be a JSON object"}]
            await send_json(send, 422, {"detail": detail})
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            result = await handler(data, headers)
        except ValidationError as exc:
            await send_json(send, 422, {"detail": validation_errors(exc)})
            return
        except HttpStatusError as exc:
            extra = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            await send_json(send, exc.status, {"detail": exc.detail}, extra)
            return
        await send_json(send, 200, result)

    return app


def _cause(exc: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (``RayTaskError.cause``)."""
    return getattr(exc, "cause", None) or exc


@dataclass
class _Route:
    config: RewardDeploymentConfig
    handle: Any  # ray.serve.handle.DeploymentHandle
    guard: HttpGuard


class RewardGateway:
    """The ASGI app: ``POST /<deployment>`` for each of ``deployments`` (config, handle).

    ``token`` turns on bearer authentication of every route (:func:`check_bind` decides
    whether a server may run without one; the CLI asks it)."""

    def __init__(
        self,
        deployments: list[tuple[RewardDeploymentConfig, Any]],
        token: SecretStr | str | None = None,
        request_timeout_s: float = 60.0,
    ) -> None:
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s ({request_timeout_s}) must be > 0")
        self.request_timeout_s = request_timeout_s
        self._routes: dict[str, _Route] = {}
        for config, handle in deployments:
            if config.name in self._routes:
                raise ValueError(f"two deployments are named {config.name!r}")
            endpoint = json_endpoint(self._forwarder(config, handle))
            guard = HttpGuard(endpoint, config.http, token=token, stats=GuardStats())
            self._routes[config.name] = _Route(config, handle, guard)
        # Unknown paths are answered by a guard too: without a token a caller learns nothing,
        # not even which deployments exist.
        self._not_found = HttpGuard(self._missing, GuardConfig(), token=token)

    def deployment(self, name: str) -> tuple[RewardDeploymentConfig, Any]:
        """The config and handle behind route ``/<name>``."""
        route = self._routes[name]
        return route.config, route.handle

    def stats(self, name: str) -> GuardStats:
        """The guard's counters of one route (by status, in flight, queued)."""
        return self._routes[name].guard.stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            while True:
                phase = (await receive())["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{phase}.complete"})
                if phase == "shutdown":
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "")
        if path == "/healthz":
            await send_json(send, 200, {"status": "ok", "deployments": sorted(self._routes)})
            return
        route = self._routes.get(path.strip("/"))
        await (route.guard if route else self._not_found)(scope, receive, send)

    async def _missing(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = ", ".join(f"/{n}" for n in sorted(self._routes))
        await send_json(send, 404, {"detail": f"no deployment at {scope.get('path')}; {routes}"})

    def _forwarder(self, config: RewardDeploymentConfig, handle: Any) -> JsonHandler:
        async def forward(body: dict[str, Any], headers: dict[str, str]) -> Any:
            carrier = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
            request_id = headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
            if config.kind == "rules":
                RuleRequest.model_validate(body)  # 422 here, before a replica sees it
                call = handle.score.remote(body, carrier, request_id=request_id)
            else:
                req = ScoreRequest.model_validate(body)
                call = handle.score.remote(
                    req.prompt, req.response, req.model_id, carrier, request_id=request_id
                )
            try:
                result = await asyncio.wait_for(_awaited(call), self.request_timeout_s)
            except (TimeoutError, asyncio.CancelledError) as exc:
                # Too late, or the client left: free the replica. The call is either not yet
                # assigned (cancelled outright) or assigned (cancelled there); an error it
                # ended with meanwhile is moot.
                with contextlib.suppress(Exception):
                    call.cancel()
                raise self._http_error(config, exc) from None
            except Exception as exc:
                raise self._http_error(config, exc) from None
            if config.kind == "rules":
                return result
            return {"reward": float(result), "meta": result.meta}

        return forward

    def _http_error(self, config: RewardDeploymentConfig, exc: BaseException) -> BaseException:
        """What an exception from a handle call means to an HTTP client."""
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError

        name = config.name
        cause = _cause(exc)
        if isinstance(exc, asyncio.CancelledError):
            return exc  # the client disconnected: nobody to answer
        if isinstance(exc, TimeoutError):
            return HttpStatusError(
                504,
                f"no reward from {name!r} within request_timeout_s={self.request_timeout_s:g}; "
                "the request was cancelled",
            )
        if isinstance(cause, BackPressureError):
            return HttpStatusError(
                503,
                f"deployment {name!r} is at capacity (max_queued_requests="
                f"{config.max_queued_requests} waiting); retry later",
                retry_after_s=1,
            )
        if isinstance(cause, JudgeParseError):  # the judge failed, not the client
            return HttpStatusError(502, {"error": "JudgeParseError", "reason": cause.reason})
        if isinstance(cause, ValidationError):  # str() of one ends with a docs URL, not the why
            return HttpStatusError(422, validation_errors(cause))
        if isinstance(cause, ValueError):  # the replica's own check (a model id, a prompt)
            return HttpStatusError(422, [{"field": "", "error": str(cause).splitlines()[-1]}])
        if isinstance(exc, ray_errors.RayActorError | ray_errors.ActorUnavailableError):
            return HttpStatusError(
                503, f"a replica of {name!r} died or is restarting; retry", retry_after_s=1
            )
        return HttpStatusError(500, f"deployment {name!r} failed: {type(cause).__name__}")


async def _awaited(response: Any) -> Any:
    return await response


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), bound before anything else
    starts so that a taken port fails at once, with its address in the message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


def uvicorn_server(app: Any, graceful_s: float) -> Any:
    """The uvicorn server the gateway runs on: quiet logs, no lifespan, and a drain of up to
    ``graceful_s`` for requests in flight when it is told to stop (SIGTERM, Ctrl-C)."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", timeout_graceful_shutdown=int(graceful_s) + 1
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def run_in_thread(app: Any, sock: socket.socket | None = None) -> Iterator[str]:
    """Serve ``app`` on a background thread while the block runs; yields its URL.

    ``sock``: a socket from :func:`bind` (default: a free port on 127.0.0.1), closed at the
    end. For embedding the gateway next to a driver that has other work (tests, a trainer);
    the CLI serves on its main thread instead, where uvicorn also drains on SIGTERM."""
    sock = sock or bind("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(app, graceful_s=5)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="tangram-reward-gateway", daemon=True
    )
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the reward gateway could not start on {host}:{port}")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
