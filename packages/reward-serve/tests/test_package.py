"""tangram_reward's import contract."""


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
