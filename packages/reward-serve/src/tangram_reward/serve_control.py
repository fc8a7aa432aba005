"""The Serve controller calls reward-serve makes: the only module that touches Serve's private
API (``ray.serve._private``), so that a Ray upgrade that moves it breaks one small file.

Why private API at all: external scaling (``update_deployment_replicas``) is what Serve's own
REST route ``POST /api/v1/applications/{app}/deployments/{dep}/scale`` calls, and calling it
directly works without the dashboard; replica counts come from the public ``serve.status()``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

__all__ = ["running_replicas", "scale_deployment", "wait_for_replicas"]


def scale_deployment(app: str, deployment: str, replicas: int) -> None:
    """Set a deployment's replica count through Serve's external-scaling API.

    This is the controller call behind Serve's REST route
    ``POST /api/v1/applications/{app}/deployments/{dep}/scale``; calling it directly works
    without the dashboard. The application must be deployed with
    ``external_scaler_enabled=True``; otherwise Serve refuses with a message that says so.
    """
    if replicas < 0:
        raise ValueError(f"replicas ({replicas}) must be >= 0")
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(deployment, app), replicas))


def running_replicas(app: str, deployment: str) -> int:
    """Replicas of ``deployment`` in state RUNNING, from ``serve.status()``."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    counts: dict[Any, int] = dict(status.deployments[deployment].replica_states)
    return int(counts.get("RUNNING", 0))  # ReplicaState is a str enum: "RUNNING" finds it


async def wait_for_replicas(app: str, deployment: str, replicas: int, timeout_s: float) -> float:
    """Wait until exactly ``replicas`` are RUNNING; returns the seconds it took."""
    import asyncio
    import time

    t0 = time.monotonic()
    while running_replicas(app, deployment) != replicas:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(
                f"{app}/{deployment}: {running_replicas(app, deployment)} replicas running "
                f"after {timeout_s:.0f}s, wanted {replicas}"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - t0
