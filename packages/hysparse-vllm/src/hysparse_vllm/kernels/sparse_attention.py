# ruff: noqa: ANN001  (Triton infers kernel argument types at launch: pointers, ints, floats)
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Block-sparse paged attention for HySparse sparse layers.

Each query token, in each KV group, attends only to the pages its group selected, in the full
layer's own cache. A program owns one (query token, KV head): its rows are the ``G`` query heads
of the group (padded to the 16 rows an MMA needs), so each selected page is read once per group,
and its loop is an online softmax over the selected pages, causal inside the token's own page.
Padded (-1) slots are skipped, not read.

* **Decode** (:func:`sparse_decode`, one query per sequence): the selected pages are split over
  ``num_splits`` programs per (sequence, KV head) and merged by log-sum-exp, so that a batch of
  a few sequences still fills the GPU.
* **Prefill / chunked prefill** (:func:`sparse_prefill`): every token is its own program (each
  token has its own selection), no split; tokens of a varlen batch find their sequence by a
  binary search over ``query_start_loc``.

The work and the bytes read are proportional to ``topk_blocks * page_size``, not to the context.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import (
    LOG2E,
    _find_seq,
    _mma,
    dot_flags,
    launch_opts,
    merge_splits,
    next_pow2,
    num_sms,
    require_triton_device,
)
from .layout import check_paged


@triton.jit
def _sparse_attn_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    qsl_ptr,
    sel_ptr,  # [T, Hkv, K] int32 logical block ids, ascending, -1 padded
    out_ptr,  # SPLITS == 1: [T, Hq, D]; else [SPLITS, T, Hq, D] fp32 partials
    lse_ptr,  # SPLITS == 1: unused; else [SPLITS, T, Hq] log2 partials
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_os,
    stride_ls,
    stride_lt,
    stride_st,
    stride_sh,
    stride_bt,
    stride_kp,
    stride_kt,
    stride_kh,
    scale_log2,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    tok = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(qsl_ptr, tok, num_seqs)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    pos = tl.load(seq_lens_ptr + seq) - q_len + (tok - q_start)
    tok64 = tok.to(tl.int64)

    sel_row = sel_ptr + tok64 * stride_st + kvh * stride_sh
    slots = tl.arange(0, K_PAD)
    ids = tl.load(sel_row + slots, mask=slots < K, other=-1)
    n_valid = tl.sum((ids >= 0).to(tl.int32), 0)  # valid ids are a prefix (ascending, -1 padded)
    per_split = tl.cdiv(K, SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_valid)

    rows = tl.arange(0, BLOCK_H)
    head = kvh * G + rows
    row_ok = rows < G
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, PAGE)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + tok64 * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    kv_head_off = kvh * stride_kh
    bt_row = block_table_ptr + seq * stride_bt
    for i in range(lo, hi):
        blk = tl.load(sel_row + i)
        page = tl.load(bt_row + blk).to(tl.int64)
        kv_off = page * stride_kp + offs_t[:, None] * stride_kt + kv_head_off + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        s = _mma(q, tl.trans(k), DOT_FP32, IEEE) * scale_log2
        s = tl.where((blk * PAGE + offs_t)[None, :] <= pos, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_FP32, IEEE)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_off = tok64 * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(out_ptr + split * stride_os + o_off, o, mask=o_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(lse_ptr + split * stride_ls + tok64 * stride_lt + head, lse, mask=row_ok)


def _check_selected(selected: torch.Tensor, num_tokens: int, num_kv_heads: int) -> None:
    if selected.dim() != 3 or selected.shape[:2] != (num_tokens, num_kv_heads):
        raise ValueError(
            f"selected must be [num_tokens={num_tokens}, num_kv_heads={num_kv_heads}, topk_blocks]"
            f" (from select_blocks), got {tuple(selected.shape)}"
        )
    if selected.dtype != torch.int32 or selected.stride(-1) != 1:
        raise ValueError(f"selected must be int32 with a unit last stride, got {selected.dtype}")


def _launch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    selected: torch.Tensor,
    scale: float | None,
    num_splits: int,
    out: torch.Tensor | None,
    launch: dict[str, int],
) -> torch.Tensor:
    shape = check_paged(q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    require_triton_device(q)
    _check_selected(selected, shape.num_tokens, shape.num_kv_heads)
    k = selected.shape[2]
    if not 1 <= num_splits <= k:
        raise ValueError(f"num_splits ({num_splits}) must be in 1..topk_blocks ({k})")
    if out is None:
        out = torch.empty_like(q)
    if shape.num_tokens == 0:
        return out
    g = shape.group_size
    if num_splits == 1:
        o_buf, lse_buf, stride_os, stride_ls = out, out, 0, 0
    else:
        o_buf = torch.empty(num_splits, *q.shape, dtype=torch.float32, device=q.device)
        lse_buf = torch.empty(
            num_splits, shape.num_tokens, shape.num_q_heads, dtype=torch.float32, device=q.device
        )
        stride_os, stride_ls = o_buf.stride(0), lse_buf.stride(0)
    sc = 1.0 / math.sqrt(shape.head_dim) if scale is None else float(scale)
    _sparse_attn_kernel[(shape.num_tokens, shape.num_kv_heads, num_splits)](
        q,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        query_start_loc,
        selected,
        o_buf,
        lse_buf,
        shape.num_seqs,
        q.stride(0),
        q.stride(1),
        o_buf.stride(-3),
        o_buf.stride(-2),
        stride_os,
        stride_ls,
        lse_buf.stride(-2),
        selected.stride(0),
        selected.stride(1),
        block_table.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        sc * LOG2E,
        G=g,
        HEAD_DIM=shape.head_dim,
        D_PAD=max(16, next_pow2(shape.head_dim)),
        PAGE=shape.page_size,
        BLOCK_H=max(16, next_pow2(g)),
        K=k,
        K_PAD=max(2, next_pow2(k)),
        SPLITS=num_splits,
        **dot_flags(q.dtype),
        **launch,
    )
    if num_splits > 1:
        lse = torch.empty(shape.num_tokens, shape.num_q_heads, dtype=torch.float32, device=q.device)
        merge_splits(o_buf, lse_buf, out, lse)
    return out


def sparse_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Sparse-branch decode: one query token per sequence (``q`` is ``[num_seqs, Hq, D]``).

    ``selected``: ``[num_seqs, Hkv, K]`` logical block ids from :func:`select_blocks` (ascending,
    -1 padded). ``num_splits`` (default: enough programs to fill the GPU, at most K) splits the
    selected pages of each (sequence, KV head) over programs merged by log-sum-exp.
    """
    num_seqs = q.shape[0]
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    if num_splits is None:
        programs = max(1, num_seqs * key_cache.shape[2])
        num_splits = max(1, min(selected.shape[-1], 2 * num_sms(q.device) // programs))
    return _launch(
        q,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        query_start_loc,
        selected,
        scale,
        num_splits,
        out,
        launch_opts(num_warps, num_stages),
    )


def sparse_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    selected: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Sparse-branch prefill / chunked prefill / mixed batches over varlen ``query_start_loc``.

    Every query token attends to its own group's selection (``selected``: ``[num_tokens, Hkv,
    K]``), causally inside its own block. Decode tokens may be part of the batch.
    """
    return _launch(
        q,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        query_start_loc,
        selected,
        scale,
        1,
        out,
        launch_opts(num_warps, num_stages),
    )
