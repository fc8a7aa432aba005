"""Vectorised PyTorch decode ops over the paged layout: the CPU path at serving sizes.

The reference (:mod:`.reference`) loops over tokens for clarity; these do a whole decode batch
(one query per sequence) with a few batched tensor ops, for the plugin's CPU backend and as
the CPU baseline of the benchmark. They implement the same contract and are tested against the
reference. Block ids in ``selected`` are logical, as everywhere in this subpackage.
"""

from __future__ import annotations

import math

import torch

from .reference import _aggregate


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked attention through torch SDPA (its fused CPU kernel handles bf16 well)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def full_decode_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    with_scores: bool = True,
    score_agg: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-layer decode (``q``: ``[num_seqs, Hq, D]``) and its per-group block scores.

    Returns ``(out [num_seqs, Hq, D]``, ``scores [num_seqs, Hkv, max_pages]`` fp32 or None).
    Without scores this is torch SDPA over the gathered pages. With scores the probabilities
    must exist as a tensor, so the softmax is explicit (fp32 logits: bf16 ones would round the
    scores) and the block mass is a reshape and a sum of them.
    """
    n, hq, d = q.shape
    _, page, hkv, _ = key_cache.shape
    g = hq // hkv
    sc = _scale(scale, d)
    pages = -(-int(seq_lens.max()) // page)
    phys = block_table[:, :pages].long()
    # Contiguous [n, Hkv, L, D]: CPU matmuls over the strided view run about 20x slower.
    k = key_cache[phys].reshape(n, pages * page, hkv, d).transpose(1, 2).contiguous()
    v = value_cache[phys].reshape(n, pages * page, hkv, d).transpose(1, 2).contiguous()
    qg = q.reshape(n, hkv, g, d)
    visible = torch.arange(pages * page, device=q.device)[None, :] < seq_lens[:, None]
    if not with_scores:
        return _sdpa(qg, k, v, visible[:, None, None, :], sc).reshape(n, hq, d), None
    logits = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * sc  # [n, Hkv, G, L]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = torch.matmul(p, v.float()).to(q.dtype).reshape(n, hq, d)
    mass = p.reshape(n, hkv * g, pages, page).sum(-1).transpose(0, 1)  # [Hq, n, pages]
    scores = torch.zeros(n, hkv, block_table.shape[1], dtype=torch.float32, device=q.device)
    scores[:, :, :pages] = _aggregate(mass, hkv, score_agg).transpose(0, 1)
    return out, scores


def sparse_decode_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse-branch decode: gather only the selected pages of each KV head, then attend.

    ``selected``: ``[num_seqs, Hkv, K]`` logical block ids, -1 padded. Reads ``K * page_size``
    tokens per (sequence, KV head), whatever the context length: one ``index_select`` of
    ``head_dim``-long rows, then torch SDPA with a mask for padding and the causal tail.
    """
    n, hq, d = q.shape
    _, page, hkv, _ = key_cache.shape
    kk = selected.shape[-1]
    valid = selected >= 0
    logical = selected.clamp(min=0).long()
    phys = torch.gather(block_table.long(), 1, logical.reshape(n, -1)).reshape(n, hkv, kk)
    head = torch.arange(hkv, device=q.device)[None, :, None, None]
    offs = torch.arange(page, device=q.device)
    rows = ((phys[..., None] * page + offs) * hkv + head).reshape(-1)  # rows of [*, D]
    k = key_cache.view(-1, d).index_select(0, rows).view(n, hkv, kk * page, d)
    v = value_cache.view(-1, d).index_select(0, rows).view(n, hkv, kk * page, d)
    t = (logical[..., None] * page + offs).reshape(n, hkv, -1)
    keep = valid.repeat_interleave(page, dim=-1) & (t < seq_lens[:, None, None])
    out = _sdpa(q.reshape(n, hkv, hq // hkv, d), k, v, keep[:, :, None, :], _scale(scale, d))
    return out.reshape(n, hq, d)
