"""vLLM's paged KV layout as the kernels see it, with the checks that give clear errors.

Every kernel in this subpackage takes the layout that vLLM's CUDA/Triton backends use
(``triton_attn.py``, ``ops/triton_unified_attention.py``):

* ``q``: ``[num_tokens, num_q_heads, head_dim]``, the query tokens of all sequences of the batch
  laid end to end (varlen). Decode is the case of one token per sequence.
* ``key_cache`` / ``value_cache``: ``[num_pages, page_size, num_kv_heads, head_dim]``.
* ``block_table``: ``[num_seqs, max_pages]`` int32; entry ``i`` of row ``s`` is the physical page
  that holds logical block ``i`` of sequence ``s`` (tokens ``i*page_size .. (i+1)*page_size-1``).
* ``seq_lens``: ``[num_seqs]`` int32, the KV length of each sequence *including* this step's
  query tokens (their K/V are already written to the cache, as vLLM does before attention).
* ``query_start_loc``: ``[num_seqs + 1]`` int32, where each sequence's query tokens start in
  ``q``; the query tokens of sequence ``s`` are its last ``q_len`` positions, so query ``i`` sits at
  position ``seq_len - q_len + i``.

The HySparse selection block is the KV page: ``block_size == page_size`` (``key_cache.shape[1]``),
so a selected logical block is exactly one page and a kernel reads it with one block-table lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScoreAgg = Literal["sum", "max"]
SCORE_AGGS: tuple[str, ...] = ("sum", "max")


@dataclass(frozen=True)
class SelectionSpec:
    """The HySparse selection knobs the kernels need (the plugin's config maps onto this).

    ``topk_blocks`` counts every selected block, the forced ones included: the sink blocks
    ``0 .. sink_blocks-1`` and the query's own (most recent) block.
    """

    topk_blocks: int = 16
    sink_blocks: int = 1
    score_agg: ScoreAgg = "sum"

    def __post_init__(self) -> None:
        if self.score_agg not in SCORE_AGGS:
            raise ValueError(f"score_agg ({self.score_agg!r}) must be one of {SCORE_AGGS}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks ({self.sink_blocks}) must be >= 0")
        if self.topk_blocks < self.sink_blocks + 1:
            raise ValueError(
                f"topk_blocks ({self.topk_blocks}) must be >= sink_blocks + 1 "
                f"({self.sink_blocks + 1}): the sinks and the query's own block are always "
                "selected and count towards topk_blocks; raise topk_blocks or lower sink_blocks"
            )


@dataclass(frozen=True)
class PagedShape:
    """Sizes read off a checked paged batch."""

    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_seqs: int
    max_pages: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


def check_paged(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> PagedShape:
    """Check shapes, dtypes and devices of a paged batch; return its sizes.

    Only metadata is checked here (no device sync): the values of ``seq_lens`` and
    ``query_start_loc`` are the caller's contract, as in vLLM.
    """
    if q.dim() != 3:
        raise ValueError(
            f"q must be [num_tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_pages, page_size, num_kv_heads, head_dim]"
            f", got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    num_tokens, hq, d = q.shape
    _, page, hkv, dk = key_cache.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and of the KV cache ({dk}) must match")
    if hq % hkv != 0:
        raise ValueError(
            f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv}) (GQA groups)"
        )
    if page < 16 or page & (page - 1):
        raise ValueError(
            f"page_size ({page}) must be a power of two >= 16: it is the selection block and the "
            "kernels' KV tile; use a vLLM block_size of 16, 32, 64 or 128"
        )
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise ValueError(
            f"q ({q.dtype}) and the KV cache ({key_cache.dtype}, {value_cache.dtype}) must share a "
            "dtype; fp8 KV caches are not supported by these kernels"
        )
    if block_table.dim() != 2:
        raise ValueError(
            f"block_table must be [num_seqs, max_pages], got {tuple(block_table.shape)}"
        )
    num_seqs = block_table.shape[0]
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [num_seqs={num_seqs}], got {tuple(seq_lens.shape)}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got "
            f"{tuple(query_start_loc.shape)}"
        )
    for name, t in (
        ("block_table", block_table),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    devices = {
        t.device for t in (q, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    }
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.stride(-1) != 1 or not key_cache.is_contiguous() or not value_cache.is_contiguous():
        raise ValueError("q must have a unit last stride and the KV caches must be contiguous")
    return PagedShape(num_tokens, hq, hkv, d, page, num_seqs, block_table.shape[1])


def token_positions(
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query token: (its sequence index, its position in that sequence), both int64."""
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    num_tokens = int(query_start_loc[-1])
    seq_of = torch.repeat_interleave(
        torch.arange(len(q_lens), device=q_lens.device), q_lens, output_size=num_tokens
    )
    first = query_start_loc[:-1].long()[seq_of]
    pos = (
        seq_lens.long()[seq_of]
        - q_lens[seq_of]
        + torch.arange(num_tokens, device=q_lens.device)
        - first
    )
    return seq_of, pos


def pack_paged(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    page_size: int,
    *,
    extra_pages: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out per-sequence K/V (each ``[len, num_kv_heads, head_dim]``) in a paged cache.

    Pages are assigned in a random order (with ``extra_pages`` unused ones mixed in), so that a
    kernel that confuses logical and physical pages fails. Unused page slots hold NaN-free random
    values, which a correct kernel never reads into a result. Returns
    ``(key_cache, value_cache, block_table, seq_lens)``; a test and benchmark helper.
    """
    if len(keys) != len(values) or not keys:
        raise ValueError("keys and values must be non-empty lists of the same length")
    hkv, d = keys[0].shape[1:]
    pages_per_seq = [-(-k.shape[0] // page_size) for k in keys]
    total = sum(pages_per_seq) + extra_pages
    order = torch.randperm(total, generator=generator)
    dev, dt = keys[0].device, keys[0].dtype
    key_cache = torch.randn(total, page_size, hkv, d, generator=generator).to(dev, dt)
    value_cache = torch.randn(total, page_size, hkv, d, generator=generator).to(dev, dt)
    block_table = torch.zeros(len(keys), max(pages_per_seq), dtype=torch.int32)
    nxt = 0
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        for i in range(pages_per_seq[s]):
            page = int(order[nxt])
            nxt += 1
            block_table[s, i] = page
            chunk = slice(i * page_size, min((i + 1) * page_size, k.shape[0]))
            n = chunk.stop - chunk.start
            key_cache[page, :n] = k[chunk]
            value_cache[page, :n] = v[chunk]
    seq_lens = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    return key_cache, value_cache, block_table.to(dev), seq_lens.to(dev)


def gather_sequence(
    cache: torch.Tensor, block_table: torch.Tensor, seq: int, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` tokens of sequence ``seq`` of a paged cache: ``[seq_len, Hkv, D]``."""
    page = cache.shape[1]
    n_pages = -(-seq_len // page)
    pages = cache[block_table[seq, :n_pages].long()]
    return pages.reshape(n_pages * page, *cache.shape[2:])[:seq_len]
