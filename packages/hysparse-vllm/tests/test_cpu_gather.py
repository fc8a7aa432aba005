"""The vLLM CPU paths (paged ``vec`` layout) against the reference maths, without vLLM."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.cpu_gather import (
    SelectionParams,
    gather_context,
    select_for_request,
    sparse_gather,
    sparse_masked,
)
from hysparse_vllm.modeling import causal_mask, full_layer_selection, masked_attention, sparse_mask

HQ, HKV, D = 4, 2, 32


def paged(k: torch.Tensor, v: torch.Tensor, page: int, seed: int = 0):
    """Write ``[Hkv, L, D]`` K/V into a shuffled paged cache in vLLM's CPU ``vec`` layout."""
    hkv, length, d = k.shape
    n = -(-length // page)
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(n + 3, generator=g)[:n].int()
    cache = torch.zeros(n + 3, hkv, page, 2 * d)
    flat = cache.view(n + 3, hkv, 2, page * d)
    for i in range(n):
        kk = torch.zeros(hkv, page, d)
        vv = torch.zeros(hkv, page, d)
        chunk = slice(i * page, min(length, (i + 1) * page))
        kk[:, : chunk.stop - chunk.start] = k[:, chunk]
        vv[:, : chunk.stop - chunk.start] = v[:, chunk]
        flat[table[i], :, 0] = kk.transpose(1, 2).reshape(hkv, -1)  # keys stored [D, P]
        flat[table[i], :, 1] = vv.reshape(hkv, -1)
    return cache, table


@pytest.mark.parametrize(("block", "page"), [(32, 32), (16, 32), (64, 32)])
def test_paths_match_reference(block, page):
    length, n_new = 150, 20  # the last 20 tokens are this step's queries (a prefill chunk)
    g = torch.Generator().manual_seed(block)
    q_all = torch.randn(length, HQ, D, generator=g)
    k = torch.randn(HKV, length, D, generator=g)
    v = torch.randn(HKV, length, D, generator=g)
    cache, table = paged(k, v, page)
    params = SelectionParams(block_size=block, topk=3, sink_blocks=1, score_agg="sum")
    scale = D**-0.5

    # reference over the whole sequence
    qr = q_all.transpose(0, 1).unsqueeze(0)
    _, probs = masked_attention(qr, k.unsqueeze(0), v.unsqueeze(0), causal_mask(length), scale)
    sel_ref = full_layer_selection(probs, HKV, block_size=block, topk=3, sink_blocks=1, agg="sum")
    mask = sparse_mask(sel_ref, length, block).repeat_interleave(HQ // HKV, dim=1)
    out_ref = masked_attention(qr, k.unsqueeze(0), v.unsqueeze(0), mask, scale)[0]
    out_ref = out_ref[0].transpose(0, 1)[-n_new:]  # [n, Hq, D]

    kt, vv = gather_context(cache, table, length)
    assert torch.equal(kt, k.transpose(1, 2))
    assert torch.equal(vv, v)
    first = length - n_new
    q = q_all[first:]
    sel = select_for_request(q, kt, first, scale, params)
    assert torch.equal(sel, sel_ref[0].transpose(0, 1)[first:])
    masked = sparse_masked(q, kt, vv, sel, first, scale, block)
    gathered = sparse_gather(q, cache, table, sel, first, scale, block)
    assert torch.allclose(masked, out_ref, atol=1e-5)
    assert torch.allclose(gathered, out_ref, atol=1e-5)


@pytest.mark.parametrize("block", [32, 16])
def test_rows_of_several_requests_in_one_call(block):
    """Decode rows of two requests (own tables and positions) batched = one call per request."""
    from hysparse_vllm.cpu_gather import sparse_gather_rows

    page, lengths = 32, (90, 150)
    g = torch.Generator().manual_seed(7)
    caches = []
    for i, length in enumerate(lengths):
        k = torch.randn(HKV, length, D, generator=g)
        v = torch.randn(HKV, length, D, generator=g)
        caches.append(paged(k, v, page, seed=i))
    # one shared pool: request 1's pages come after request 0's
    pool = torch.cat([caches[0][0], caches[1][0]])
    tables = [caches[0][1], caches[1][1] + caches[0][0].shape[0]]
    width = max(t.numel() for t in tables)
    padded = torch.stack([torch.nn.functional.pad(t, (0, width - t.numel())) for t in tables])
    q = torch.randn(4, HQ, D, generator=g)
    req = torch.tensor([0, 1, 1, 0])
    pos = torch.tensor([89, 148, 149, 60])
    nb = [-(-x // block) for x in lengths]
    sel = torch.stack(
        [
            torch.stack(
                [torch.tensor([0, max(1, nb[r] // 2), int(p) // block]) for _ in range(HKV)]
            )
            for r, p in zip(req.tolist(), pos.tolist(), strict=True)
        ]
    )
    batched = sparse_gather_rows(q, pool, padded[req], pos, sel, D**-0.5, block)
    for i in range(4):
        one = sparse_gather(
            q[i : i + 1], pool, tables[int(req[i])], sel[i : i + 1], int(pos[i]), D**-0.5, block
        )
        assert torch.allclose(batched[i], one[0], atol=1e-6)
