"""HySparse attention over vLLM's paged CPU KV cache, in PyTorch (no vLLM import).

vLLM's CPU backend stores a layer's cache as ``[num_pages, Hkv, P, 2*D]``. With the ``vec``
ISA (x86 without AMX, head_dim a multiple of 32) each (page, head) holds the keys as a
transposed ``[D, P]`` tile followed by the values as ``[P, D]``. These functions read that
layout directly, so the sparse branch can gather only the blocks it selected.

Two paths compute the same maths (checked against the reference model in the tests):

* ``masked``: gather the whole context once per request and mask it (prefill chunks);
* ``gather``: gather only the selected blocks per (query, KV group) (decode; this is where
  HySparse saves work: ``K * B`` keys instead of the whole context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import aggregate_heads, block_mass, select_blocks, selected_block_mask

# Queries x keys x heads per chunk of the masked paths (bounds the fp32 logits buffer).
MAX_LOGITS_ELEMS = 1 << 24


@dataclass(frozen=True)
class SelectionParams:
    """The selection contract's knobs, as the backend needs them."""

    block_size: int
    topk: int
    sink_blocks: int
    score_agg: str


@dataclass(frozen=True)
class RequestSpan:
    """One request's rows in the flattened batch and its context length after this step."""

    start: int  # first query row
    end: int  # one past the last query row
    seq_len: int  # tokens in context, this step's queries included

    @property
    def first_pos(self) -> int:
        return self.seq_len - (self.end - self.start)


def paged_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[pages, Hkv, P, 2D]`` -> keys ``[pages, Hkv, D, P]`` and values ``[pages, Hkv, P, D]``."""
    pages, hkv, p, d2 = kv_cache.shape
    d = d2 // 2
    flat = kv_cache.view(pages, hkv, 2, p * d)
    return flat[:, :, 0].view(pages, hkv, d, p), flat[:, :, 1].view(pages, hkv, p, d)


def gather_context(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's keys, transposed ``[Hkv, D, seq_len]``, and values ``[Hkv, seq_len, D]``.

    Keys stay transposed as the cache stores them: ``q @ K^T`` then needs no transpose, and the
    copy moves whole ``P``-float runs (a strided transpose copy is several times slower on CPU).
    """
    keys, values = paged_views(kv_cache)
    hkv, d, p = keys.shape[1:]
    n = -(-seq_len // p)
    pages = block_table_row[:n].long()
    # one gathering copy each, straight into the token-major layout
    kt = keys.permute(1, 2, 0, 3)[:, :, pages].reshape(hkv, d, n * p)[:, :, :seq_len]
    v = values.permute(1, 0, 2, 3)[:, pages].reshape(hkv, n * p, d)[:, :seq_len]
    return kt, v


def _grouped_logits(q: torch.Tensor, kt: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[n, Hq, D]``, keys ``[Hkv, D, L]`` -> logits ``[Hkv, G, n, L]`` in fp32.

    One batched matmul per KV head over its G x n query rows: a broadcast matmul of
    ``[Hkv, G, n, D]`` by ``[Hkv, 1, D, L]`` would first copy the keys G times (1 GB at 32k)."""
    n, hq, d = q.shape
    hkv = kt.shape[0]
    g = hq // hkv
    qg = q.float().view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
    return (torch.bmm(qg, kt.float()) * scale).view(hkv, g, n, -1)


def _chunk(n: int, cols: int, heads: int) -> int:
    return max(1, MAX_LOGITS_ELEMS // max(1, cols * heads)) if n else 1


def select_for_request(
    q: torch.Tensor, k: torch.Tensor, first_pos: int, scale: float, params: SelectionParams
) -> torch.Tensor:
    """Full-layer block selection for one request's queries: ``[n, Hkv, topk]`` int64.

    ``k`` holds the request's keys transposed, ``[Hkv, D, L]`` (see :func:`gather_context`).
    """
    n, hq, _ = q.shape
    hkv, _, length = k.shape
    nb = -(-length // params.block_size)
    out = torch.empty(n, hkv, params.topk, dtype=torch.long)
    key_pos = torch.arange(length)
    step = _chunk(n, length, hq)
    for s in range(0, n, step):
        qpos = torch.arange(first_pos + s, first_pos + min(n, s + step))
        logits = _grouped_logits(q[s : s + step], k, scale)  # [Hkv, G, c, L]
        logits = logits.masked_fill(key_pos[None, :] > qpos[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        mass = block_mass(probs, params.block_size, nb).flatten(0, 1)  # [Hq, c, NB]
        scores = aggregate_heads(mass, hkv, params.score_agg, head_dim=0)  # [Hkv, c, NB]
        sel = select_blocks(
            scores,
            qpos,
            block_size=params.block_size,
            topk=params.topk,
            sink_blocks=params.sink_blocks,
        )
        out[s : s + step] = sel.transpose(0, 1)
    return out


def sparse_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    first_pos: int,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """Sparse branch for one request by masking its whole context: ``[n, Hq, D]``.

    ``k`` is ``[Hkv, D, L]`` (transposed), ``v`` is ``[Hkv, L, D]``.
    """
    n, hq, d = q.shape
    length = k.shape[2]
    nb = -(-length // block_size)
    out = torch.empty(n, hq, d, dtype=q.dtype)
    key_pos = torch.arange(length)
    token_block = key_pos // block_size
    step = _chunk(n, length, hq)
    for s in range(0, n, step):
        e = min(n, s + step)
        qpos = torch.arange(first_pos + s, first_pos + e)
        blocks = selected_block_mask(sel[s:e].transpose(0, 1), nb)  # [Hkv, c, NB]
        allowed = blocks[..., token_block] & (key_pos[None, None, :] <= qpos[None, :, None])
        logits = _grouped_logits(q[s:e], k, scale)  # [Hkv, G, c, L]
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        o = torch.matmul(probs, v.float().unsqueeze(1))  # [Hkv, G, c, D]
        out[s:e] = o.permute(2, 0, 1, 3).reshape(e - s, hq, d).to(q.dtype)
    return out


def sparse_gather(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    sel: torch.Tensor,
    first_pos: int,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """:func:`sparse_gather_rows` for consecutive queries of one request."""
    n = q.shape[0]
    tables = block_table_row.unsqueeze(0).expand(n, -1)
    qpos = torch.arange(first_pos, first_pos + n)
    return sparse_gather_rows(q, kv_cache, tables, qpos, sel, scale, block_size)


def sparse_gather_rows(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    tables: torch.Tensor,
    qpos: torch.Tensor,
    sel: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """Sparse branch reading only the selected blocks from the paged cache: ``[n, Hq, D]``.

    Each query row ``i`` carries its own block table ``tables[i]`` and position ``qpos[i]``,
    so the decode rows of every request in a step go through one call. When a selection
    block is one cache page (``block_size`` = vLLM's block size, the default pairing) whole
    key/value tiles are gathered; otherwise tokens are gathered one by one.
    """
    n, hq, d = q.shape
    keys, values = paged_views(kv_cache)
    hkv, p = keys.shape[1], keys.shape[-1]
    k_sel = sel.shape[-1]
    tables = tables.long()
    offs = torch.arange(block_size)
    blocks = sel.clamp(min=0)
    tok = blocks.unsqueeze(-1) * block_size + offs  # [n, Hkv, K, B]
    valid = (sel >= 0).unsqueeze(-1) & (tok <= qpos.view(n, 1, 1, 1))
    valid = valid.view(n, hkv, 1, k_sel * block_size)
    head = torch.arange(hkv).view(1, hkv, 1)
    if block_size == p:
        phys = tables.gather(1, blocks.view(n, hkv * k_sel)).view(n, hkv, k_sel)
        # whole tiles: the keys' [D, P] tiles turned token-major, then the values' [P, D]
        ks = keys[phys, head].transpose(-1, -2).reshape(n, hkv, k_sel * p, d)
        vs = values[phys, head].reshape(n, hkv, k_sel * p, d)
    else:
        flat = tok.view(n, hkv * k_sel * block_size)
        page = (flat // p).clamp(max=tables.shape[1] - 1)
        phys = tables.gather(1, page).view(n, hkv, k_sel * block_size)
        off = (flat % p).view(n, hkv, k_sel * block_size)
        ks = keys[phys, head, :, off]  # [n, Hkv, KB, D]
        vs = values[phys, head, off, :]  # [n, Hkv, KB, D]
    # torch's fused SDPA with the mask: about 4x faster on CPU than an explicit fp32 softmax
    # over the gathered keys (tools/bench/hysparse_kernels.py), and no fp32 copy of them
    qg = q.view(n, hkv, hq // hkv, d)
    out = torch.nn.functional.scaled_dot_product_attention(qg, ks, vs, attn_mask=valid, scale=scale)
    return out.reshape(n, hq, d)
