"""A Ray Serve application builder: deploy a reward with Serve's own tools.

    serve run tangram_reward.serve_builder:app kind=rules num_cpus=0.5
    serve run tangram_reward.serve_builder:app kind=scalar_rm model_path=/models/rm
    serve run rewards-serve.yaml            # or serve deploy, with a Serve config file:

    applications:
      - name: rules
        import_path: tangram_reward.serve_builder:app
        args: {kind: rules, num_cpus: 0.5, max_batch_size: 64}
      - name: judge
        import_path: tangram_reward.serve_builder:app
        args:
          kind: judge
          model_path: /models/judge
          judge: {score_min: 1, score_max: 10}

``args`` hold the fields of one entry of ``deployments:`` in ``rewards.yaml``
(:class:`~tangram_reward.deployment_config.RewardDeploymentConfig`); ``name`` defaults to the
kind. One application serves one deployment: a Serve config lists one application per reward.
On the ``serve run`` command line every value is a string; the nested fields (``judge``,
``env``, ``http``) take JSON there (``judge='{"score_max": 5}'``).

Why a builder and not only ``tangram-reward serve``: a Ray Serve user already has a cluster,
config files and ``serve deploy``; the builder gives them the same validated deployments.
Like the CLI's, the application has no HTTP route: callers use handles
(``serve.get_app_handle(name).score.remote(...)``), the reward manager
(:class:`~tangram_reward.manager.RewardManager`), or the TRL plug-in
(:class:`~tangram_reward.trl.TangramReward` with ``rules_app``/``rm_app``).
A bad argument raises ValueError naming the field and the rule, before anything is deployed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tangram_reward.deployment_config import RewardDeploymentConfig, first_error

__all__ = ["app", "deployment_from_args"]

_JSON_FIELDS = ("judge", "env", "http")


def deployment_from_args(args: Mapping[str, Any]) -> RewardDeploymentConfig:
    """Serve's ``args`` as a validated deployment config; errors name the field and the rule."""
    if not isinstance(args, Mapping):
        raise TypeError(f"builder args must be a mapping of field to value, got {type(args)}")
    fields = dict(args)
    if "deployments" in fields:
        raise ValueError(
            "args hold one deployment (the fields of one entry of rewards.yaml's "
            "'deployments:'); give each deployment its own application in the Serve config"
        )
    for key in _JSON_FIELDS:
        value = fields.get(key)
        if isinstance(value, str):  # from `serve run ... key=value`
            try:
                fields[key] = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"{key}: not valid JSON ({exc}): {value!r}") from None
    if "name" not in fields and isinstance(fields.get("kind"), str):
        fields["name"] = fields["kind"]
    try:
        return RewardDeploymentConfig.model_validate(fields)
    except ValidationError as exc:
        who = fields.get("name", "?")
        raise ValueError(f"reward deployment {who!r}: {first_error(exc)}") from None


def app(args: dict[str, Any]) -> Any:
    """The Serve application builder (``import_path: tangram_reward.serve_builder:app``)."""
    from tangram_reward.serve_app import build_app

    return build_app(deployment_from_args(args))
