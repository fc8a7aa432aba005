"""``tangram-reward``: run reward deployments declared in YAML, ``serve run``-style.

    tangram-reward check rewards.yaml          # validate only; no Ray needed
    tangram-reward serve rewards.yaml          # start local Ray + Serve on 127.0.0.1, print health
    tangram-reward serve rewards.yaml --once   # ... and exit once every deployment is healthy
    tangram-reward serve rewards.yaml --token-file ~/.tangram_token   # require a bearer token

The file holds a list of deployments, each a :class:`RewardDeploymentConfig`::

    deployments:
      - {name: rules, kind: rules, num_cpus: 0.5}
      - {name: rm, kind: scalar_rm, model_path: /models/rm, max_batch_size: 32, num_gpus: 0.25}
      - name: judge
        kind: judge
        model_path: /models/judge
        judge: {score_min: 1, score_max: 10, max_tokens: 64}

A bad file exits with status 2 and names the deployment, the field and the rule.

HTTP is safe by default: the gateway (:mod:`tangram_reward.gateway`, ``POST /<name>`` per
deployment) listens on 127.0.0.1 unless ``http_host`` says otherwise, and any other address
needs a bearer token (``$TANGRAM_API_TOKEN``, ``$TANGRAM_API_TOKEN_FILE`` or ``--token-file``;
never a command-line value). Serve's own HTTP proxy is not started. Ray's own token
authentication stays on.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from tangram_reward.deployment_config import RewardDeploymentConfig

DISTRIBUTION = "tangram-reward-serve"
# What each kind needs beyond the base install, by top-level module and the extra that has it.
_SERVE_EXTRA = {"ray.serve": "serve"}
_MODEL_EXTRA = {"torch": "models", "transformers": "models"}


class MissingExtraError(ImportError):
    """A command needs an optional dependency that is not installed; the message says which
    extra installs it. The CLI answers it with exit status 2, never a traceback."""


def require_extra(modules: dict[str, str], purpose: str) -> None:
    """Import each of ``modules`` (top-level name -> extra) or raise :class:`MissingExtraError`
    naming the extra, so a missing dependency is reported before anything starts."""
    import importlib

    for module, extra in modules.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(
                f"{purpose} needs {module}, which is not installed ({exc}); "
                f"install it with: pip install '{DISTRIBUTION}[{extra}]'"
            ) from None


class RewardServeFile(BaseModel):
    """The whole YAML file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    deployments: list[dict[str, object]] = Field(min_length=1)
    http_host: str = Field("127.0.0.1", description="Beyond loopback needs a bearer token.")
    http_port: int = Field(8000, ge=0, le=65535)
    http_request_timeout_s: float = Field(
        60.0, gt=0, description="End-to-end HTTP deadline; past it the gateway answers 504."
    )

    @model_validator(mode="after")
    def _unique(self) -> RewardServeFile:
        names = [d.get("name") for d in self.deployments]
        dup = sorted({str(n) for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"deployment names must be unique; repeated: {dup}")
        return self


def load_config(path: Path) -> tuple[RewardServeFile, list[RewardDeploymentConfig]]:
    """Parse and validate the file; errors name the deployment index, field and rule."""
    import yaml

    from tangram_reward.deployment_config import RewardDeploymentConfig, first_error

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        top = RewardServeFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ValueError(f"{path}: {first_error(exc)}") from None
    configs: list[RewardDeploymentConfig] = []
    for i, entry in enumerate(top.deployments):
        try:
            configs.append(RewardDeploymentConfig.model_validate(entry))
        except ValidationError as exc:
            raise ValueError(
                f"{path}: deployments[{i}] ({entry.get('name', '?')}): {first_error(exc)}"
            ) from None
    return top, configs


def _serve(path: Path, once: bool, token_file: Path | None) -> int:
    top, configs = load_config(path)
    require_extra(_SERVE_EXTRA, "tangram-reward serve (Ray Serve)")
    models = sorted({c.kind for c in configs if c.kind != "rules"})
    if models:
        require_extra(_MODEL_EXTRA, f"a {' or '.join(models)} deployment")
    import ray
    from ray import serve

    from tangram_core.http.guard import check_bind, load_token
    from tangram_core.telemetry import configure_telemetry
    from tangram_reward.gateway import RewardGateway, bind, run_in_thread, uvicorn_server
    from tangram_reward.serve_app import build_app
    from tangram_reward.serve_control import running_replicas

    telemetry = configure_telemetry(service_name="tangram-reward")
    token = load_token(token_file)  # TokenError is a ValueError: exit 2 with its message
    check_bind(top.http_host, token, service="tangram-reward")
    if token is None:
        print(
            f"warning: HTTP on {top.http_host} without a token: any local user can call it; "
            "set TANGRAM_API_TOKEN or pass --token-file to require one",
            file=sys.stderr,
        )
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print(
            "warning: RAY_AUTH_MODE=disabled turns off Ray's token authentication: anyone who "
            "reaches the Ray ports controls the cluster, rewards included; unset it",
            file=sys.stderr,
        )
    sock = bind(top.http_host, top.http_port)  # a taken port fails now, not after Ray starts
    port = sock.getsockname()[1]
    # RAY_ADDRESS joins a cluster on purpose; without it, a Ray of the server's own: a plain
    # ray.init() would join whatever cluster a `ray start` last recorded in /tmp/ray (another
    # user's, or a dead one, whose GCS it then waits for)
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or "local",
        include_dashboard=False,
        log_to_driver=False,
    )
    # No Serve HTTP proxy: the gateway below is the only HTTP surface (see its module).
    serve.start(proxy_location="Disabled")
    try:
        deployed = [
            (
                cfg,
                serve.run(
                    build_app(cfg), name=cfg.name, route_prefix=None, external_scaler_enabled=True
                ),
            )
            for cfg in configs
        ]
        gateway = RewardGateway(deployed, token=token, request_timeout_s=top.http_request_timeout_s)
        print(f"{'deployment':<20} {'kind':<10} {'replicas':>8}  route")
        for cfg in configs:
            n = running_replicas(cfg.name, cfg.name)
            url = f"http://{top.http_host}:{port}/{cfg.name}"
            print(f"{cfg.name:<20} {cfg.kind:<10} {n:>8}  {url}")
        if once:
            with run_in_thread(gateway, sock) as url:  # the gateway starts and answers
                import urllib.request

                with urllib.request.urlopen(url + "/healthz", timeout=30) as resp:
                    print(f"gateway: {resp.status} {resp.read().decode()}")
            return 0
        print("serving; Ctrl-C or SIGTERM to stop (requests in flight are finished first)")
        # uvicorn drains on SIGTERM, then raises the signal again for the handler it found:
        # make that one a clean stop (exit 0 after the drain), like Ctrl-C, not Ray's exit 15.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        uvicorn_server(gateway, graceful_s=top.http_request_timeout_s).run(sockets=[sock])
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
        serve.shutdown()  # type: ignore[no-untyped-call]  # untyped in Ray 2.60
        ray.shutdown()
        telemetry.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tangram-reward", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a deployments file")
    check.add_argument("config", type=Path)
    run = sub.add_parser("serve", help="run the deployments locally and print their health")
    run.add_argument("config", type=Path)
    run.add_argument("--once", action="store_true", help="exit once all are healthy")
    run.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file (mode 600) holding the HTTP bearer token; else $TANGRAM_API_TOKEN or "
        "$TANGRAM_API_TOKEN_FILE. There is no option for the token itself (ps shows it).",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            _, configs = load_config(args.config)
            print(f"{args.config}: {len(configs)} deployment(s) OK")
            return 0
        return _serve(args.config, args.once, args.token_file)
    except (OSError, ValueError, MissingExtraError) as exc:
        print(f"tangram-reward {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
