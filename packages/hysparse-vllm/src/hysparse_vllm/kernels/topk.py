# ruff: noqa: ANN001  (Triton infers kernel argument types at launch: pointers, ints, floats)
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Top-k block selection on the GPU: normalise, aggregate over the KV group, pick.

One program per (query token, KV head). It reads the ``G`` heads' ``block_lse`` rows of its
token once, turns them into block masses with the row ``lse`` (the normalisation the fused
full-attention kernel left for here), aggregates them (``sum`` or ``max``), forces the sink
blocks and the token's own block, and takes the best remaining blocks one argmax at a time,
ties to the lower index. The result is the contract's list: ascending **logical** block ids,
padded with -1.

Why logical and not physical page ids: the sparse kernel needs the logical id anyway for its
causal mask inside the own block, and the physical page is one int32 load from the block table
per 64-token page (under 0.01% of the page's K/V bytes). Logical ids also stay valid if the
scheduler moves pages between the full layer and its sparse layers, and they are what the
plugin's PyTorch path and the reference produce, so both paths can be compared directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _find_seq, next_pow2, require_triton_device
from .layout import SelectionSpec


@triton.jit
def _topk_kernel(
    block_lse_ptr,  # [T, Hq, max_pages] fp32, natural log
    lse_ptr,  # [T, Hq] fp32, natural log
    seq_lens_ptr,
    qsl_ptr,
    out_ptr,  # [T, Hkv, K] int32
    num_seqs,
    max_blocks,
    stride_blt,
    stride_blh,
    stride_lt,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    PAGE: tl.constexpr,
    NB_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SINKS: tl.constexpr,
    AGG_MAX: tl.constexpr,
):
    tok = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(qsl_ptr, tok, num_seqs)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    pos = tl.load(seq_lens_ptr + seq) - q_len + (tok - q_start)
    own = pos // PAGE

    b = tl.arange(0, NB_PAD)
    cand = (b <= own) & (b < max_blocks)
    tok64 = tok.to(tl.int64)
    score = tl.zeros([NB_PAD], dtype=tl.float32)
    for j in tl.static_range(G):
        h = kvh * G + j
        row_lse = tl.load(lse_ptr + tok64 * stride_lt + h)
        x = tl.load(block_lse_ptr + tok64 * stride_blt + h * stride_blh + b, mask=cand, other=0.0)
        mass = tl.where(cand, tl.exp(x - row_lse), 0.0)
        if AGG_MAX:  # noqa: SIM108 (a constexpr branch inside a Triton kernel)
            score = tl.maximum(score, mass)
        else:
            score = score + mass

    forced = cand & ((b < SINKS) | (b == own))
    picked = forced
    key = tl.where(cand & ~forced, score, float("-inf"))
    for _ in tl.static_range(K):
        best = tl.argmax(key, 0, tie_break_left=True)
        take = (tl.max(key, 0) > float("-inf")) & (tl.sum(picked.to(tl.int32), 0) < K)
        hit = b == tl.where(take, best, -1)
        picked = picked | hit
        key = tl.where(hit, float("-inf"), key)

    # Ascending output without a sort: the i-th picked block goes to slot i.
    slot = tl.cumsum(picked.to(tl.int32), 0) - 1
    k = tl.arange(0, K_PAD)
    match = picked[None, :] & (slot[None, :] == k[:, None])
    ids = tl.sum(tl.where(match, b[None, :], 0), 1)
    count = tl.sum(picked.to(tl.int32), 0)
    ids = tl.where(k < count, ids, -1)
    tl.store(out_ptr + tok64 * stride_ot + kvh * stride_oh + k, ids.to(tl.int32), mask=k < K)


def select_blocks(
    block_lse: torch.Tensor,
    lse: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    num_kv_heads: int,
    block_size: int,
    spec: SelectionSpec,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HySparse top-k selection from the fused kernel's statistics.

    ``block_lse``: ``[num_tokens, Hq, max_pages]`` and ``lse``: ``[num_tokens, Hq]`` from
    :func:`hysparse_vllm.kernels.full_attention` (natural log). Returns ``[num_tokens, Hkv,
    spec.topk_blocks]`` int32 logical block ids, ascending, -1 padded; a token's selection
    holds ``min(topk_blocks, own_block + 1)`` ids.
    """
    require_triton_device(block_lse)
    if block_lse.dim() != 3 or lse.shape != block_lse.shape[:2]:
        raise ValueError(
            f"block_lse must be [num_tokens, Hq, max_pages] and lse [num_tokens, Hq], got "
            f"{tuple(block_lse.shape)} and {tuple(lse.shape)}"
        )
    num_tokens, hq, max_blocks = block_lse.shape
    if hq % num_kv_heads:
        raise ValueError(f"Hq ({hq}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_lse.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("block_lse and lse must have a unit last stride")
    k = spec.topk_blocks
    if out is None:
        out = torch.empty(num_tokens, num_kv_heads, k, dtype=torch.int32, device=block_lse.device)
    if num_tokens == 0:
        return out
    _topk_kernel[(num_tokens, num_kv_heads)](
        block_lse,
        lse,
        seq_lens,
        query_start_loc,
        out,
        seq_lens.shape[0],
        max_blocks,
        block_lse.stride(0),
        block_lse.stride(1),
        lse.stride(0),
        out.stride(0),
        out.stride(1),
        G=hq // num_kv_heads,
        PAGE=block_size,
        NB_PAD=max(16, next_pow2(max_blocks)),
        K=k,
        K_PAD=max(2, next_pow2(k)),
        SINKS=spec.sink_blocks,
        AGG_MAX=spec.score_agg == "max",
    )
    return out
