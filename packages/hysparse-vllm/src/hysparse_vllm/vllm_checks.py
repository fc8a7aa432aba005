"""Engine-start checks for HySparse in vLLM: refuse clearly what the plugin cannot run.

The plugin hooks :class:`HySparseEngineCheck` into vLLM's per-architecture config hooks, so the
checks run in the front-end process while vLLM builds its config: the user sees the reasons in
the exception, not an "engine core initialization failed" pointing at a worker's log. The model
runs them again when it is built (e.g. when another front end skipped the hook).
"""

from __future__ import annotations

from typing import Any


def check_engine_config(vllm_config: Any) -> None:
    """Refuse, at engine start, what this plugin cannot run, saying what to change."""
    from .vllm_backend import HySparseAttentionBackend

    config = vllm_config.model_config.hf_config
    problems = HySparseAttentionBackend.unsupported_reasons(
        head_dim=config.dim,
        dtype=vllm_config.model_config.dtype,
        kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
    )
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        problems.append("tensor parallelism is not supported (use tensor_parallel_size=1)")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append("pipeline parallelism is not supported (use pipeline_parallel_size=1)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if vllm_config.lora_config is not None:
        problems.append("LoRA is not supported")
    max_len = vllm_config.model_config.max_model_len
    covered = config.topk_blocks * config.block_size
    if covered > max_len:
        problems.append(
            f"topk_blocks * block_size ({covered}) exceeds max_model_len ({max_len}): every "
            "sparse layer would attend densely; raise max_model_len or lower topk_blocks"
        )
    if problems:
        raise ValueError("HySparse cannot run this engine configuration: " + "; ".join(problems))


class HySparseEngineCheck:
    """vLLM ``MODELS_CONFIG_MAP`` hook for ``HySparseForCausalLM``."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        check_engine_config(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return
