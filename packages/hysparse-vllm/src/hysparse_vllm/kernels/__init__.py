"""HySparse kernels over vLLM's paged KV layout: fused full attention with block scores,
top-k block selection, and block-sparse attention for sparse layers.

Importing this subpackage imports torch and Triton (``import hysparse_vllm`` does not). The
Triton kernels run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` for tests; the PyTorch
reference in :mod:`.reference` is the oracle. The plugin's CPU path is not here: it reads
vLLM-CPU's own cache layout (:mod:`hysparse_vllm.cpu_gather`).

Layout (that of vLLM's Triton/FlashAttention backends; see :mod:`.layout`): ``q`` is
``[num_tokens, Hq, D]``; ``key_cache``/``value_cache`` ``[num_pages, page_size, Hkv, D]``;
``block_table`` ``[num_seqs, max_pages]`` maps logical block ``i`` to a physical page;
``seq_lens`` ``[num_seqs]`` counts KV tokens including this step's; ``query_start_loc``
``[num_seqs + 1]``. The selection block is the page (``block_size == page_size``).

A full layer then its sparse layers, on CUDA::

    res = full_attention(q, kc, vc, block_table, seq_lens, qsl, max_query_len=m)
    sel = select_blocks(
        res.block_lse,
        res.lse,
        seq_lens,
        qsl,
        num_kv_heads=kc.shape[2],
        block_size=kc.shape[1],
        spec=SelectionSpec(),
    )
    out = sparse_decode(q2, kc, vc, block_table, seq_lens, sel)  # decode batch
    out = sparse_prefill(q2, kc, vc, block_table, seq_lens, qsl, sel)  # prefill / mixed

``sel`` holds logical block ids (ascending, -1 padded), one list per (token, KV head).
"""

from .full_attention import FullAttentionResult, full_attention
from .layout import SelectionSpec, pack_paged, token_positions
from .reference import (
    dense_causal_attention,
    full_attention_reference,
    scores_from_block_lse,
    select_blocks_reference,
    sparse_attention_reference,
)
from .sparse_attention import sparse_decode, sparse_prefill
from .topk import select_blocks

__all__ = [
    "FullAttentionResult",
    "SelectionSpec",
    "dense_causal_attention",
    "full_attention",
    "full_attention_reference",
    "pack_paged",
    "scores_from_block_lse",
    "select_blocks",
    "select_blocks_reference",
    "sparse_attention_reference",
    "sparse_decode",
    "sparse_prefill",
    "token_positions",
]
