"""vLLM worker extension: load new policy weights in place inside the engine's worker process.

vLLM imports this class by name in each worker (``worker_extension_cls``) and mixes it into the
worker, so ``self`` is the worker and ``self.model_runner`` its model runner. The trainer writes
a safetensors file and calls :meth:`load_weights_from` through ``LLM.collective_rpc``. vLLM's
``reload_weights`` is used, not ``model.load_weights``: on CPU the linear layers repack their
weights at load time, and only the reload path redoes that.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    model_runner: Any

    def load_weights_from(self, path: str) -> float:
        """Reload every weight from ``path`` (a folder of safetensors); return a fingerprint."""
        self.model_runner.reload_weights(weights_path=path, is_checkpoint_format=True)
        model = self.model_runner.get_model()
        for name, param in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                return float(param.detach().double().sum())
        raise KeyError("the engine's model has no embed_tokens.weight")
