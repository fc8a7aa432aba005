"""Block-sparse paged attention (decode and prefill) against the reference."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.kernels import (
    SelectionSpec,
    full_attention,
    full_attention_reference,
    select_blocks,
    select_blocks_reference,
    sparse_attention_reference,
    sparse_decode,
    sparse_prefill,
)

CASES = [
    (1, 64, torch.float32, 16),
    (4, 128, torch.bfloat16, 16),
    (8, 64, torch.bfloat16, 32),
    (4, 64, torch.float32, 32),
]


def _case_id(case: tuple[int, int, torch.dtype, int]) -> str:
    g, d, dt, page = case
    return f"G{g}-d{d}-{str(dt).split('.')[-1]}-page{page}"


def _reference_selection(b, k: int, sinks: int = 1) -> torch.Tensor:
    _, scores = full_attention_reference(*b.paged)
    page = b.key_cache.shape[1]
    return select_blocks_reference(
        scores, b.positions, block_size=page, spec=SelectionSpec(topk_blocks=k, sink_blocks=sinks)
    )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prefill_matches_reference(case, make_batch, tol) -> None:
    g, d, dtype, page = case
    hkv = 2 if g == 1 else 1
    # Chunked prefill with context ending mid-page, a short first chunk, and a decode token.
    b = make_batch(
        [5 * page + 7, 19, 3 * page + 1],
        [9, 19, 1],
        hq=g * hkv,
        hkv=hkv,
        d=d,
        page=page,
        dtype=dtype,
    )
    sel = _reference_selection(b, k=3)
    assert (sel == -1).any()  # the short sequence pads
    out = sparse_prefill(*b.paged, sel)
    want = sparse_attention_reference(*b.paged, sel)
    torch.testing.assert_close(out.float(), want.float(), **tol[dtype])


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_decode_matches_reference(splits: int, make_batch, tol) -> None:
    b = make_batch([150, 33, 64, 9], [1, 1, 1, 1], hq=8, hkv=2, d=64, dtype=torch.bfloat16)
    sel = _reference_selection(b, k=5, sinks=2)
    out = sparse_decode(
        b.q, b.key_cache, b.value_cache, b.block_table, b.seq_lens, sel, num_splits=splits
    )
    want = sparse_attention_reference(*b.paged, sel)
    torch.testing.assert_close(out.float(), want.float(), **tol[torch.bfloat16])


def test_all_blocks_selected_equals_dense(make_batch, tol) -> None:
    b = make_batch([60, 35], [14, 1], hq=4, hkv=1, d=64)
    sel = _reference_selection(b, k=8)  # >= every token's candidate count
    dense, _ = full_attention_reference(*b.paged)
    torch.testing.assert_close(sparse_prefill(*b.paged, sel), dense, **tol[torch.float32])
    dec = make_batch([60, 35], [1, 1], hq=4, hkv=1, d=64)
    sel = _reference_selection(dec, k=8)
    dense, _ = full_attention_reference(*dec.paged)
    out = sparse_decode(
        dec.q, dec.key_cache, dec.value_cache, dec.block_table, dec.seq_lens, sel, num_splits=2
    )
    torch.testing.assert_close(out, dense, **tol[torch.float32])


def test_full_then_sparse_layer_pipeline(make_batch, tol) -> None:
    # The HySparse forward: the full layer's kernels select, a sparse layer with its own queries
    # attends to the selected pages of the same cache.
    b = make_batch([77, 41], [10, 1], hq=8, hkv=2, d=64, seed=5)
    spec = SelectionSpec(topk_blocks=3, sink_blocks=1)
    res = full_attention(*b.paged, max_query_len=b.max_query_len)
    assert res.block_lse is not None
    sel = select_blocks(
        res.block_lse,
        res.lse,
        b.seq_lens,
        b.query_start_loc,
        num_kv_heads=2,
        block_size=16,
        spec=spec,
    )
    ref_out, ref_scores = full_attention_reference(*b.paged)
    torch.testing.assert_close(res.out, ref_out, **tol[torch.float32])
    ref_sel = select_blocks_reference(ref_scores, b.positions, block_size=16, spec=spec)
    assert torch.equal(sel, ref_sel)
    q_sparse = torch.randn_like(b.q)
    out = sparse_prefill(q_sparse, *b.paged[1:], sel)
    want = sparse_attention_reference(q_sparse, *b.paged[1:], ref_sel)
    torch.testing.assert_close(out, want, **tol[torch.float32])


def test_rejects_a_wrong_selection_shape(make_batch) -> None:
    b = make_batch([20], [4], hq=4, hkv=2, d=64)
    with pytest.raises(ValueError, match="selected must be"):
        sparse_prefill(*b.paged, torch.zeros(4, 1, 2, dtype=torch.int32, device=b.q.device))


@pytest.mark.gpu
def test_full_size_on_gpu(make_batch, tol) -> None:
    # Page 64, GQA 8, head_dim 128, bf16: 4k decode contexts and a 300-token chunk, top-16.
    b = make_batch(
        [4096, 3000, 1500, 4001], [1, 1, 300, 1], hq=32, hkv=4, d=128, page=64, dtype=torch.bfloat16
    )
    sel = _reference_selection(b, k=16)
    out = sparse_prefill(*b.paged, sel)
    want = sparse_attention_reference(*b.paged, sel)
    torch.testing.assert_close(out.float(), want.float(), **tol[torch.bfloat16])
    dec = make_batch(
        [8192] * 4 + [700] * 4, [1] * 8, hq=32, hkv=4, d=128, page=64, dtype=torch.bfloat16
    )
    sel = _reference_selection(dec, k=32)
    out = sparse_decode(dec.q, dec.key_cache, dec.value_cache, dec.block_table, dec.seq_lens, sel)
    want = sparse_attention_reference(*dec.paged, sel)
    torch.testing.assert_close(out.float(), want.float(), **tol[torch.bfloat16])
