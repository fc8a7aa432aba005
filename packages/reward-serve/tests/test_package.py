"""tangram_reward's import contract."""

import pytest


def test_import_does_not_start_serve_or_torch(imported_modules):
    # Ray Serve and torch are extras ([serve], [models]); rule-based rewards must work without them.
    loaded = imported_modules("tangram_reward")
    assert not loaded & {"ray", "torch", "transformers", "vllm"}, loaded


def test_models_import_loads_no_engine(imported_modules):
    # The judge and the reward model import torch, transformers and vLLM when built, not before.
    loaded = imported_modules("tangram_reward.models")
    assert not loaded & {"ray", "torch", "transformers", "vllm"}, loaded


def test_config_builder_trl_and_cli_modules_load_no_ray_or_torch(imported_modules):
    # `tangram-reward check`, the Serve builder's validation and the TRL plug-in's rules run
    # on the base install; Ray and torch come in only when a deployment or pool needs them.
    for module in (
        "tangram_reward.deployment_config",
        "tangram_reward.serve_builder",
        "tangram_reward.trl",
        "tangram_reward.cli",
    ):
        loaded = imported_modules(module)
        assert not loaded & {"ray", "torch", "transformers", "vllm", "trl"}, (module, loaded)


@pytest.mark.parametrize(
    "module",
    [
        "tangram_reward.schemas",
        "tangram_reward.gateway",
        "tangram_reward.cli",
        "tangram_reward.trl",
    ],
)
def test_validation_and_the_gateway_import_no_ray(imported_modules, module: str) -> None:
    """``tangram-reward check``, the HTTP gateway's request validation and the TRL reward
    function work on a machine without the [serve] extra; Ray lives in serve_app and
    serve_control only."""
    assert "ray" not in imported_modules(module)
