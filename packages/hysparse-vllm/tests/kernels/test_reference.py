"""The PyTorch reference of the selection contract: hand-computed cases and dense attention."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.kernels import (
    SelectionSpec,
    dense_causal_attention,
    full_attention_reference,
    pack_paged,
    select_blocks_reference,
    sparse_attention_reference,
    token_positions,
)
from hysparse_vllm.kernels.layout import check_paged


def _select(scores: list[float], pos: int, *, block: int = 4, k: int, sinks: int = 1) -> list[int]:
    s = torch.tensor(scores, dtype=torch.float32)[None, None, :]
    out = select_blocks_reference(
        s,
        torch.tensor([pos]),
        block_size=block,
        spec=SelectionSpec(topk_blocks=k, sink_blocks=sinks),
    )
    return out[0, 0].tolist()


def test_uniform_attention_block_mass_by_hand() -> None:
    # Zero keys: every visible token gets the same probability 1/(pos+1).
    q = torch.randn(4, 1, 2)
    k = torch.zeros(4, 1, 2)
    v = torch.arange(8, dtype=torch.float32).reshape(4, 1, 2)
    out, scores = dense_causal_attention(q, k, v, block_size=2)
    assert torch.allclose(scores[:, 0], torch.tensor([[1, 0], [1, 0], [2 / 3, 1 / 3], [0.5, 0.5]]))
    # Each output is the mean of the visible values.
    expected = torch.stack([v[: i + 1, 0].mean(0) for i in range(4)])
    assert torch.allclose(out[:, 0], expected)


def test_sum_and_max_aggregate_the_heads_of_a_group() -> None:
    # Two query heads in one KV group; head 0 looks only at token 0, head 1 only at token 2.
    k = torch.tensor([[[10.0, 0.0]], [[0.0, 0.0]], [[0.0, 10.0]]])  # [3 tokens, 1 kv head, 2]
    v = torch.zeros(3, 1, 2)
    q = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])  # position 2, two heads
    _, s_sum = dense_causal_attention(q, k, v, block_size=2, scale=1.0, score_agg="sum")
    _, s_max = dense_causal_attention(q, k, v, block_size=2, scale=1.0, score_agg="max")
    assert torch.allclose(s_sum[0, 0], torch.tensor([1.0, 1.0]), atol=1e-6)
    assert torch.allclose(s_max[0, 0], torch.tensor([1.0, 1.0]), atol=1e-6)
    assert s_sum[0, 0].sum() == pytest.approx(2.0)  # sum over a group of G heads sums to G


def test_selection_by_hand() -> None:
    # pos 23 with blocks of 4: own block 5, candidates 0..5; sink 0 and 5 forced.
    assert _select([0.0, 0.9, 0.1, 0.5, 0.3, 0.0], 23, k=4) == [0, 1, 3, 5]
    # Ties go to the lower block index.
    assert _select([0.0, 0.2, 0.2, 0.2, 0.1, 0.0], 23, k=4) == [0, 1, 2, 5]
    # No sinks: only the own block is forced.
    assert _select([0.9, 0.8, 0.1, 0.5, 0.3, 0.0], 23, k=3, sinks=0) == [0, 1, 5]
    # Two sinks.
    assert _select([0.0, 0.0, 0.1, 0.5, 0.3, 0.0], 23, k=4, sinks=2) == [0, 1, 3, 5]
    # Fewer candidates than K: all of them, padded with -1; blocks past the own block never.
    assert _select([0.1, 0.2, 9.0, 9.0, 9.0, 9.0], 5, k=4) == [0, 1, -1, -1]
    # Forced blocks win even with the lowest scores.
    assert _select([0.0, 5.0, 4.0, 3.0, 2.0, 0.0], 22, k=2) == [0, 5]


def test_full_reference_equals_sdpa_over_shuffled_pages() -> None:
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, page = 8, 2, 32, 16
    kv_lens, _q_lens = [50, 17, 33], [50, 1, 9]  # prefill, decode, chunked prefill
    keys = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    values = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    kc, vc, bt, sl = pack_paged(keys, values, page, extra_pages=4, generator=g)
    qsl = torch.tensor([0, 50, 51, 60], dtype=torch.int32)
    q = torch.randn(60, hq, d, generator=g)
    out, scores = full_attention_reference(q, kc, vc, bt, sl, qsl)
    for s in range(3):
        lo, hi = int(qsl[s]), int(qsl[s + 1])
        n = kv_lens[s]
        mask = torch.arange(n)[None, :] <= torch.arange(n - (hi - lo), n)[:, None]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1),
            keys[s].transpose(0, 1),
            values[s].transpose(0, 1),
            attn_mask=mask,
            enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(out[lo:hi], want, atol=1e-5, rtol=1e-5)
    # Each head's block masses sum to 1, so a group's "sum" scores sum to G.
    torch.testing.assert_close(scores.sum(-1), torch.full((60, hkv), hq / hkv))
    _, pos = token_positions(sl, qsl)
    past_own = torch.arange(scores.shape[-1])[None, :] > (pos // page)[:, None]
    assert (scores.permute(0, 2, 1)[past_own] == 0).all()


def test_sparse_reference_with_all_blocks_equals_dense() -> None:
    g = torch.Generator().manual_seed(2)
    hq, hkv, d, page = 4, 1, 16, 16
    kv_lens, _q_lens = [70, 40], [30, 1]
    keys = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    values = [torch.randn(n, hkv, d, generator=g) for n in kv_lens]
    kc, vc, bt, sl = pack_paged(keys, values, page, generator=g)
    qsl = torch.tensor([0, 30, 31], dtype=torch.int32)
    q = torch.randn(31, hq, d, generator=g)
    dense, scores = full_attention_reference(q, kc, vc, bt, sl, qsl)
    _, pos = token_positions(sl, qsl)
    every = select_blocks_reference(scores, pos, block_size=page, spec=SelectionSpec(topk_blocks=8))
    torch.testing.assert_close(
        sparse_attention_reference(q, kc, vc, bt, sl, qsl, every), dense, atol=1e-5, rtol=1e-5
    )
    # With fewer blocks it differs, and it equals attention restricted to those blocks by hand.
    few = select_blocks_reference(scores, pos, block_size=page, spec=SelectionSpec(topk_blocks=2))
    sparse = sparse_attention_reference(q, kc, vc, bt, sl, qsl, few)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    t = 29  # last token of sequence 0, position 69, own block 4
    keep = torch.isin(torch.arange(70) // page, few[t, 0][few[t, 0] >= 0].long())
    logits = q[t] @ keys[0][keep, 0].T / d**0.5
    torch.testing.assert_close(sparse[t], torch.softmax(logits, -1) @ values[0][keep, 0])


def test_agrees_with_the_plugins_selection() -> None:
    selection = pytest.importorskip("hysparse_vllm.selection")
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 2, 12, generator=g).round(decimals=1)  # many exact ties
    pos = torch.randint(0, 12 * 8, (40,), generator=g)
    for k, sinks in ((4, 1), (3, 0), (6, 2)):
        ours = select_blocks_reference(
            scores, pos, block_size=8, spec=SelectionSpec(topk_blocks=k, sink_blocks=sinks)
        )
        theirs = selection.select_blocks(
            scores, pos[:, None], block_size=8, topk=k, sink_blocks=sinks
        )
        assert torch.equal(ours.long(), theirs.long())


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"topk_blocks \(1\) must be >= sink_blocks \+ 1"):
        SelectionSpec(topk_blocks=1, sink_blocks=1)
    with pytest.raises(ValueError, match="score_agg"):
        SelectionSpec(score_agg="mean")  # type: ignore[arg-type]
    q = torch.zeros(3, 6, 16)
    kc = torch.zeros(4, 16, 4, 16)
    bt = torch.zeros(1, 4, dtype=torch.int32)
    sl = torch.tensor([3], dtype=torch.int32)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_q_heads \(6\) must be a multiple of num_kv_heads"):
        check_paged(q, kc, kc, bt, sl, qsl)
    kc24 = torch.zeros(4, 24, 2, 16)
    with pytest.raises(ValueError, match=r"page_size \(24\) must be a power of two"):
        check_paged(q, kc24, kc24, bt, sl, qsl)
