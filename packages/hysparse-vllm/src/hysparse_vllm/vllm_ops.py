"""Custom ops that carry HySparse's per-forward data through vLLM's compiled model.

``torch.ops.hysparse.select_blocks`` turns a full layer's queries (and its freshly written
cache) into the block selection tensor; ``torch.ops.hysparse.sparse_attention`` consumes that
tensor in a sparse layer. Both are opaque to torch.compile (their insides loop over requests
with data-dependent shapes), look their layer, cache and metadata up in vLLM's forward context
as vLLM's own attention op does, and have fake implementations with static output shapes.
The selection is an ordinary tensor flowing down the decoder loop, so it is per forward pass
and safe under batching; nothing is stored on a module between passes.
"""

from __future__ import annotations

import torch
from torch.library import Library
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

_LIB = Library("hysparse", "FRAGMENT")  # type: ignore[no-untyped-call]  # module-level: the ops live as long as it does


def _context(layer_name: str) -> tuple[object, object, torch.Tensor]:
    ctx = get_forward_context()
    md = ctx.attn_metadata
    if isinstance(md, list):  # speculative decoding: [0] is the base model's
        md = md[0]
    layer = ctx.no_compile_layers[layer_name]
    layer_md = md.get(layer_name) if isinstance(md, dict) else md
    return layer, layer_md, layer.kv_cache


def select_blocks(
    query: torch.Tensor, attn_output: torch.Tensor, layer_name: str, num_kv_heads: int, topk: int
) -> torch.Tensor:
    """Block selection ``[T, Hkv, topk]`` (int64, -1 padded) of full layer ``layer_name``.

    ``attn_output`` is unused: depending on it orders this op after the layer's attention,
    hence after its cache write.
    """
    del attn_output
    layer, md, kv_cache = _context(layer_name)
    impl = layer.impl  # type: ignore[attr-defined]
    out = torch.empty(query.shape[0], num_kv_heads, topk, dtype=torch.long)
    impl.select(
        layer, query.view(query.shape[0], impl.num_heads, impl.head_size), kv_cache, md, out
    )
    return out


def _select_blocks_fake(
    query: torch.Tensor, attn_output: torch.Tensor, layer_name: str, num_kv_heads: int, topk: int
) -> torch.Tensor:
    return torch.empty(query.shape[0], num_kv_heads, topk, dtype=torch.long, device=query.device)


def sparse_attention(
    query: torch.Tensor, selection: torch.Tensor, output: torch.Tensor, layer_name: str
) -> None:
    """Sparse branch of layer ``layer_name`` (a KV-sharing layer) into ``output``."""
    layer, md, kv_cache = _context(layer_name)
    impl = layer.impl  # type: ignore[attr-defined]
    t = query.shape[0]
    impl.sparse_forward(
        layer,
        query.view(t, impl.num_heads, impl.head_size),
        selection,
        kv_cache,
        md,
        output.view(t, impl.num_heads, impl.head_size),
    )


direct_register_custom_op(
    op_name="select_blocks",
    op_func=select_blocks,
    mutates_args=[],
    fake_impl=_select_blocks_fake,
    target_lib=_LIB,
)
direct_register_custom_op(
    op_name="sparse_attention",
    op_func=sparse_attention,
    mutates_args=["output"],
    target_lib=_LIB,
)
