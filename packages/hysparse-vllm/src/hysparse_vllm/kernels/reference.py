"""Plain PyTorch reference of the HySparse selection contract over vLLM's paged KV layout.

Written for clarity, not speed: one sequence at a time, full fp32 softmax matrices. It is the
oracle of the Triton kernels' tests. The block mass, the head aggregation and the top-k rule
are :mod:`hysparse_vllm.selection`'s, the one statement of the contract that the reference
model and the vLLM CPU backend (:mod:`hysparse_vllm.cpu_gather`) use too. In short (see the
package README for the full text):

1. Full layer: ``p[h,q,t] = softmax_{t<=q}(q_h . k_t * scale)``; block mass
   ``m[h,q,b] = sum_{t in b, t<=q} p[h,q,t]``.
2. Block score per KV group ``g``: ``sum`` or ``max`` of ``m`` over the ``G`` query heads of ``g``.
3. Selection per query token and KV group: candidates ``0..q//B``; forced are the sinks
   ``0..S-1`` and the own block ``q//B``; ``K`` counts all selected blocks; the rest go to the best
   scores, ties to the lower block index; ascending, padded with -1.
4. Sparse branch: head ``h`` of group ``g`` attends causally to the tokens of the selected blocks
   of ``(g, q)`` in the full layer's cache.

Block indices are *logical* (block ``b`` of a sequence holds positions ``b*B .. b*B+B-1``).
"""

from __future__ import annotations

import math

import torch

from ..selection import aggregate_heads, block_mass, select_blocks
from .layout import SelectionSpec, check_paged, gather_sequence, token_positions


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    score_agg: str = "sum",
    q_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, dense layout: causal GQA attention and the contract's block scores.

    ``q``: ``[q_len, Hq, D]`` at positions ``q_offset .. q_offset+q_len-1`` (default: the last
    ``q_len`` positions); ``k``/``v``: ``[kv_len, Hkv, D]``. Returns ``(out [q_len, Hq, D]`` in
    q's dtype, ``scores [q_len, Hkv, ceil(kv_len/block_size)]`` fp32), where a block past the
    query's position scores 0 (it holds no token the query sees).
    """
    q_len, hq, d = q.shape
    kv_len, hkv, _ = k.shape
    g = hq // hkv
    offset = kv_len - q_len if q_offset is None else q_offset
    qf = q.float().transpose(0, 1)  # [Hq, q_len, D]
    kf = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, kv_len, D]
    vf = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    logits = qf @ kf.transpose(1, 2) * _scale(scale, d)  # [Hq, q_len, kv_len]
    qpos = torch.arange(q_len, device=q.device) + offset
    visible = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    out = (p @ vf).transpose(0, 1).to(q.dtype)
    mass = block_mass(p, block_size)  # [Hq, q_len, n_blocks]
    scores = aggregate_heads(mass, hkv, score_agg, head_dim=0).transpose(0, 1).contiguous()
    return out, scores


def full_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    scale: float | None = None,
    score_agg: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-layer causal attention over a paged batch, plus per-block scores per KV group.

    Returns ``(out [num_tokens, Hq, D]`` in q's dtype, ``scores [num_tokens, Hkv, max_pages]``
    fp32). Scores of blocks past a token's own block are 0.
    """
    shape = check_paged(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    out = torch.empty_like(q)
    scores = torch.zeros(
        shape.num_tokens, shape.num_kv_heads, shape.max_pages, dtype=torch.float32, device=q.device
    )
    for s in range(shape.num_seqs):
        lo, hi = int(query_start_loc[s]), int(query_start_loc[s + 1])
        if hi == lo:
            continue
        n = int(seq_lens[s])
        k = gather_sequence(key_cache, block_table, s, n)
        v = gather_sequence(value_cache, block_table, s, n)
        o, sc = dense_causal_attention(
            q[lo:hi], k, v, block_size=shape.page_size, scale=scale, score_agg=score_agg
        )
        out[lo:hi] = o
        scores[lo:hi, :, : sc.shape[-1]] = sc
    return out, scores


def select_blocks_reference(
    scores: torch.Tensor, positions: torch.Tensor, *, block_size: int, spec: SelectionSpec
) -> torch.Tensor:
    """Top-k logical blocks per (token, KV group): ``[num_tokens, Hkv, topk_blocks]`` int32.

    ``scores``: ``[num_tokens, Hkv, max_blocks]``; ``positions``: ``[num_tokens]``, each token's
    position in its sequence. Forced blocks (sinks, own block) always win; the rest are ranked by
    score with a stable sort, so equal scores go to the lower block index.
    """
    num_tokens, _, max_blocks = scores.shape
    own = positions.long() // block_size
    if num_tokens and int(own.max()) >= max_blocks:
        i = int(torch.argmax(own))
        raise ValueError(
            f"token {i} at position {int(positions[i])} needs block {int(own[i])} but scores "
            f"have only {max_blocks} blocks"
        )
    picked = select_blocks(
        scores,
        positions.long().view(num_tokens, 1).to(scores.device),
        block_size=block_size,
        topk=spec.topk_blocks,
        sink_blocks=spec.sink_blocks,
    )
    return picked.to(torch.int32)


def sparse_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    selected: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse-branch attention: each (token, head) sees only its group's selected blocks.

    ``selected``: ``[num_tokens, Hkv, K]`` logical block ids, -1 for padding. Causal inside the
    token's own block. Returns ``[num_tokens, Hq, D]`` in q's dtype.
    """
    shape = check_paged(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    if selected.shape[:2] != (shape.num_tokens, shape.num_kv_heads):
        raise ValueError(
            f"selected must be [num_tokens={shape.num_tokens}, "
            f"num_kv_heads={shape.num_kv_heads}, K], got {tuple(selected.shape)}"
        )
    g = shape.group_size
    sc = _scale(scale, shape.head_dim)
    out = torch.empty_like(q)
    seq_of, pos = token_positions(seq_lens, query_start_loc)
    for i in range(shape.num_tokens):
        s, p = int(seq_of[i]), int(pos[i])
        k = gather_sequence(key_cache, block_table, s, p + 1).float()  # [p+1, Hkv, D]
        v = gather_sequence(value_cache, block_table, s, p + 1).float()
        tok_block = torch.arange(p + 1, device=q.device) // shape.page_size
        for kvh in range(shape.num_kv_heads):
            sel = selected[i, kvh]
            allowed = torch.isin(tok_block, sel[sel >= 0].long())  # [p+1]
            heads = slice(kvh * g, (kvh + 1) * g)
            logits = q[i, heads].float() @ k[:, kvh].T * sc  # [G, p+1]
            prob = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            out[i, heads] = (prob @ v[:, kvh]).to(q.dtype)
    return out


def scores_from_block_lse(
    block_lse: torch.Tensor,
    lse: torch.Tensor,
    positions: torch.Tensor,
    *,
    block_size: int,
    num_kv_heads: int,
    score_agg: str = "sum",
) -> torch.Tensor:
    """Turn the fused kernel's raw statistics into the contract's block scores.

    ``block_lse[t, h, b]`` is the log-sum-exp of token ``t``'s scaled logits of head ``h`` over
    the visible tokens of block ``b``; ``lse[t, h]`` is the row's log-sum-exp over all visible
    tokens. The block mass is ``exp(block_lse - lse)``: exact whatever order or split the kernel
    used, which is why the kernel records these instead of normalised masses. Returns
    ``[num_tokens, Hkv, max_blocks]`` fp32, 0 past each token's own block.
    """
    blocks = torch.arange(block_lse.shape[-1], device=block_lse.device)
    visible = (blocks[None, :] <= (positions[:, None] // block_size))[:, None, :]
    # Entries past a token's own block are never written by the kernel: mask, don't multiply.
    mass = torch.where(visible, torch.exp(block_lse.float() - lse.float()[:, :, None]), 0.0)
    return aggregate_heads(mass, num_kv_heads, score_agg, head_dim=1).contiguous()
