"""tangram_reward's import contract."""


def test_import_does_not_start_serve_or_torch(imported_modules):
    # Ray Serve and torch are extras ([serve], [models]); rule-based rewards must work without them.
    loaded = imported_modules("tangram_reward")
    assert not loaded & {"ray", "torch", "transformers", "vllm"}, loaded


def test_models_import_loads_no_engine(imported_modules):
    # The judge and the reward model import torch, transformers and vLLM when built, not before.
    loaded = imported_modules("tangram_reward.models")
    assert not loaded & {"ray", "torch", "transformers", "vllm"}, loaded
