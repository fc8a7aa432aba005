"""A vLLM worker extension that reports where the KV cache went (tests and benchmarks).

Start an engine with ``worker_extension_cls="hysparse_vllm.vllm_inspect.KVCacheInspector"``
and call ``llm.collective_rpc("hysparse_kv_layout")``: the answer is plain data, so it crosses
vLLM's process boundary without pickling code.
"""

from __future__ import annotations

from typing import Any


class KVCacheInspector:
    """Mixed into vLLM's worker: ``self`` is the worker."""

    def hysparse_kv_layout(self) -> dict[str, Any]:
        """Blocks, owning layers, bytes, groups, and vLLM's own capacity at max_model_len."""
        from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

        worker: Any = self
        cfg = worker.model_runner.kv_cache_config
        tokens, concurrency = get_kv_cache_capacity(worker.vllm_config, cfg)
        return {
            "num_blocks": cfg.num_blocks,
            "owners": sorted({name for t in cfg.kv_cache_tensors for name in t.layers}),
            "bytes": sum(t.size for t in cfg.kv_cache_tensors),
            "capacity_tokens": tokens,
            "max_concurrency": concurrency,
            "max_model_len": worker.vllm_config.model_config.max_model_len,
            "groups": [
                {
                    "spec": type(g.kv_cache_spec).__name__,
                    "block_size": g.kv_cache_spec.block_size,
                    "page_bytes": g.kv_cache_spec.page_size_bytes,
                    "layers": list(g.layer_names),
                }
                for g in cfg.kv_cache_groups
            ],
        }
