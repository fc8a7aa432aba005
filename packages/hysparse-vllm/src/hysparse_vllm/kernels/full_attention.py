# ruff: noqa: ANN001  (Triton infers kernel argument types at launch: pointers, ints, floats)
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Fused full-layer paged attention that also records the HySparse block statistics.

One kernel serves decode and (chunked) prefill over vLLM's paged layout. A program owns one
query tile of one sequence and one KV head; its rows are the tile's tokens times the ``G`` query
heads of that KV group, so each K/V page is read once per group. The KV tile is one page, which
is also the selection block. While the online softmax runs, the kernel records for every row
and block the block's log-sum-exp of the scaled logits (``block_lse``); the rows' final
log-sum-exp (``lse``) comes out at the end. The block mass is then ``exp(block_lse - lse)``,
exact whatever the split, so scoring needs no second pass over K and no normalised values
inside the loop. The extra work per page is one log and one row rescale of the P.V product:
``exp(s - m_block)`` replaces ``exp(s - m_running)``, so no exponential is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_common import (
    LOG2E,
    _mma,
    dot_flags,
    launch_opts,
    merge_splits,
    next_pow2,
    num_sms,
    require_triton_device,
)
from .layout import check_paged


@dataclass(frozen=True)
class FullAttentionResult:
    """Output of :func:`full_attention`.

    ``out``: ``[num_tokens, Hq, D]`` in q's dtype. ``lse``: ``[num_tokens, Hq]`` fp32, each row's
    log-sum-exp of the scaled logits (natural log). ``block_lse``: ``[num_tokens, Hq, max_pages]``
    fp32, the same per logical block (natural log), or None when scores were not asked for;
    entries past a token's own block are not written (undefined).
    """

    out: torch.Tensor
    lse: torch.Tensor
    block_lse: torch.Tensor | None


@triton.jit
def _full_attn_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    qsl_ptr,
    out_ptr,  # SPLITS == 1: [T, Hq, D]; else [SPLITS, T, Hq, D] fp32 partials
    lse_ptr,  # SPLITS == 1: [T, Hq] natural log; else [SPLITS, T, Hq] log2 partials
    block_lse_ptr,  # [T, Hq, max_pages] fp32, natural log
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_ls,
    stride_bt,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_blt,
    stride_blh,
    scale_log2,
    num_q_heads,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    SPLITS: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, PAGE)
    qi = q_tile * BLOCK_Q + offs_m // G
    head = kvh * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (qi < q_len)
    pos = ctx + qi
    tok = (q_start + qi).to(tl.int64)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    last_q = tl.minimum(q_len, (q_tile + 1) * BLOCK_Q) - 1
    n_blocks = (ctx + last_q) // PAGE + 1
    per_split = tl.cdiv(n_blocks, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_blocks)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    kv_head_off = kvh * stride_kh
    for b in range(lo, hi):
        page = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
        kv_off = page * stride_kp + offs_t[:, None] * stride_kt + kv_head_off + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        s = _mma(q, tl.trans(k), DOT_FP32, IEEE) * scale_log2
        visible = (b * PAGE + offs_t)[None, :] <= pos[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_blk = tl.max(s, 1)
        m_new = tl.maximum(m_i, m_blk)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        if WRITE_SCORES:
            m_blk_ref = tl.where(m_blk == float("-inf"), 0.0, m_blk)
            p = tl.exp2(s - m_blk_ref[:, None])
            l_blk = tl.sum(p, 1)
            blk_lse = (m_blk_ref + tl.log2(tl.where(l_blk == 0.0, 1.0, l_blk))) * 0.6931471805599453
            tl.store(
                block_lse_ptr + tok * stride_blt + head * stride_blh + b,
                blk_lse,
                mask=row_ok & (b * PAGE <= pos),
            )
            beta = tl.exp2(m_blk - m_ref)
            pv = _mma(p.to(v.dtype), v, DOT_FP32, IEEE)
            acc = acc * alpha[:, None] + pv * beta[:, None]
            l_i = l_i * alpha + l_blk * beta
        else:
            p = tl.exp2(s - m_ref[:, None])
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_FP32, IEEE)
            l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        tl.store(
            out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
        )
        row_lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(lse_ptr + tok * stride_lt + head, row_lse, mask=row_ok)
    else:
        tl.store(out_ptr + split * stride_os + o_off, o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(
            lse_ptr + split * stride_ls + tok * stride_lt + head,
            tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)),
            mask=row_ok,
        )


def full_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    max_query_len: int | None = None,
    scale: float | None = None,
    with_scores: bool = True,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_m: int | None = None,
) -> FullAttentionResult:
    """Causal paged attention of a full layer, recording per-block statistics for selection.

    Decode (``max_query_len == 1``) and prefill/chunked prefill (varlen ``query_start_loc``)
    use the same kernel. ``max_query_len`` sizes the launch grid (vLLM's metadata has it);
    without it the host reads it from ``query_start_loc`` (a device sync). ``num_splits``
    splits each sequence's pages over several programs and merges them with their
    log-sum-exp (decode only; default: enough programs to fill the GPU). ``num_warps`` and
    ``num_stages`` override Triton's launch defaults; ``block_m`` sets the rows of a program
    (query tokens x the ``G`` heads of a group; default 16 for decode, 64 for prefill).
    Feed ``block_lse`` and ``lse`` to :func:`hysparse_vllm.kernels.select_blocks`.
    """
    shape = check_paged(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    require_triton_device(q)
    if max_query_len is None:
        max_query_len = (
            int((query_start_loc[1:] - query_start_loc[:-1]).max()) if shape.num_seqs else 0
        )
    g = shape.group_size
    decode = max_query_len <= 1
    if block_m is None:
        block_m = max(16 if decode else 64, next_pow2(g))
    elif block_m < max(16, g) or block_m & (block_m - 1):
        raise ValueError(
            f"block_m ({block_m}) must be a power of two >= max(16, heads per KV group = {g})"
        )
    block_q = block_m // g
    if num_splits is None:
        programs = shape.num_seqs * shape.num_kv_heads
        num_splits = min(16, max(1, 2 * num_sms(q.device) // max(programs, 1))) if decode else 1
    if num_splits < 1 or (num_splits > 1 and not decode):
        raise ValueError(
            f"num_splits ({num_splits}) must be >= 1, and 1 unless every sequence has at most one "
            "query token (decode)"
        )
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(shape.num_tokens, shape.num_q_heads, dtype=torch.float32, device=q.device)
    block_lse = (
        torch.empty(
            shape.num_tokens,
            shape.num_q_heads,
            shape.max_pages,
            dtype=torch.float32,
            device=q.device,
        )
        if with_scores
        else None
    )
    if shape.num_tokens == 0:
        return FullAttentionResult(out, lse, block_lse)
    if num_splits == 1:
        o_buf, lse_buf = out, lse
        stride_os = stride_ls = 0
    else:
        o_buf = torch.empty(num_splits, *q.shape, dtype=torch.float32, device=q.device)
        lse_buf = torch.empty(num_splits, *lse.shape, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = o_buf.stride(0), lse_buf.stride(0)
    sc = 1.0 / math.sqrt(shape.head_dim) if scale is None else float(scale)
    bl = block_lse if block_lse is not None else lse  # unused pointer when not scoring
    grid = (shape.num_seqs, triton.cdiv(max_query_len, block_q), shape.num_kv_heads * num_splits)
    _full_attn_kernel[grid](
        q,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        query_start_loc,
        o_buf,
        lse_buf,
        bl,
        q.stride(0),
        q.stride(1),
        o_buf.stride(-3),
        o_buf.stride(-2),
        stride_os,
        lse_buf.stride(-2),
        stride_ls,
        block_table.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        bl.stride(0),
        bl.stride(1),
        sc * LOG2E,
        shape.num_q_heads,
        G=g,
        HEAD_DIM=shape.head_dim,
        D_PAD=max(16, next_pow2(shape.head_dim)),
        PAGE=shape.page_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        SPLITS=num_splits,
        WRITE_SCORES=with_scores,
        **dot_flags(q.dtype),
        **launch_opts(num_warps, num_stages),
    )
    if num_splits > 1:
        merge_splits(o_buf, lse_buf, out, lse)
    return FullAttentionResult(out, lse, block_lse)
