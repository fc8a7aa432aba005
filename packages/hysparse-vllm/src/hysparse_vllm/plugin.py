"""vLLM ``general_plugins`` entry point: registers HySparse in every vLLM process.

vLLM calls :func:`register` in the front end, the engine core and each worker. It teaches
transformers the ``hysparse`` config (vLLM reads ``config.json`` through ``AutoConfig``) and
registers the model lazily by dotted path, so that vLLM imports the model module (and the
custom ops) only in the processes that build the model.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

MODEL_ARCH = "HySparseForCausalLM"
MODEL_PATH = "hysparse_vllm.vllm_model:HySparseForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from . import register_transformers

    register_transformers()
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .vllm_checks import HySparseEngineCheck

    MODELS_CONFIG_MAP.setdefault(MODEL_ARCH, HySparseEngineCheck)  # type: ignore[arg-type]
    if MODEL_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCH, MODEL_PATH)
        logger.debug("registered %s -> %s", MODEL_ARCH, MODEL_PATH)
