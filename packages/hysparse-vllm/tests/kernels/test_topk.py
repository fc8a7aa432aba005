"""Top-k block selection kernel against the reference selection."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.kernels import (
    SelectionSpec,
    full_attention,
    scores_from_block_lse,
    select_blocks,
    select_blocks_reference,
)


@pytest.mark.parametrize(("agg", "k", "sinks"), [("sum", 3, 1), ("max", 4, 0), ("sum", 5, 2)])
def test_selection_from_fused_statistics(agg: str, k: int, sinks: int, make_batch) -> None:
    # Sequence 1 (a short chunked prefill) has fewer candidate blocks than k for some tokens.
    b = make_batch([150, 40, 23], [6, 5, 1], hq=8, hkv=2, d=64, page=16, seed=k)
    res = full_attention(*b.paged, max_query_len=b.max_query_len)
    assert res.block_lse is not None
    spec = SelectionSpec(topk_blocks=k, sink_blocks=sinks, score_agg=agg)  # type: ignore[arg-type]
    got = select_blocks(
        res.block_lse,
        res.lse,
        b.seq_lens,
        b.query_start_loc,
        num_kv_heads=2,
        block_size=16,
        spec=spec,
    )
    scores = scores_from_block_lse(
        res.block_lse, res.lse, b.positions, block_size=16, num_kv_heads=2, score_agg=agg
    )
    want = select_blocks_reference(scores, b.positions, block_size=16, spec=spec)
    assert got.dtype == torch.int32
    assert got.shape == (12, 2, k)
    assert torch.equal(got, want)
    # The contract's invariants, checked directly as well.
    own = (b.positions // 16)[:, None]
    for t in range(12):
        for g in range(2):
            ids = [i for i in got[t, g].tolist() if i >= 0]
            assert ids == sorted(ids)
            assert len(ids) == min(k, int(own[t]) + 1)
            assert int(own[t]) in ids
            assert all(s in ids for s in range(min(sinks, int(own[t]) + 1)))


@pytest.mark.parametrize(("agg", "g"), [("sum", 2), ("max", 4)])
def test_ties_go_to_the_lower_block(agg: str, g: int, device: torch.device) -> None:
    # Block statistics drawn from three values: many exact ties between blocks.
    gen = torch.Generator().manual_seed(7)
    seq_lens = torch.tensor([100, 57, 8, 64], dtype=torch.int32)  # decode: own blocks 12, 7, 0, 7
    qsl = torch.arange(5, dtype=torch.int32)
    hq = 2 * g
    block_lse = torch.randint(0, 3, (4, hq, 13), generator=gen).float()
    lse = torch.full((4, hq), 4.0)
    positions = seq_lens.long() - 1
    spec = SelectionSpec(topk_blocks=5, sink_blocks=1, score_agg=agg)  # type: ignore[arg-type]
    got = select_blocks(
        block_lse.to(device),
        lse.to(device),
        seq_lens.to(device),
        qsl.to(device),
        num_kv_heads=2,
        block_size=8,
        spec=spec,
    )
    scores = scores_from_block_lse(
        block_lse, lse, positions, block_size=8, num_kv_heads=2, score_agg=agg
    )
    want = select_blocks_reference(scores, positions, block_size=8, spec=spec)
    assert torch.equal(got.cpu(), want)
    # All-equal scores: the lowest non-forced blocks win.
    flat = select_blocks(
        torch.zeros_like(block_lse).to(device),
        lse.to(device),
        seq_lens.to(device),
        qsl.to(device),
        num_kv_heads=2,
        block_size=8,
        spec=spec,
    )
    assert flat[0, 0].tolist() == [0, 1, 2, 3, 12]
    assert flat[2, 1].tolist() == [0, -1, -1, -1, -1]


def test_rejects_mismatched_statistics(device: torch.device) -> None:
    with pytest.raises(ValueError, match="lse"):
        select_blocks(
            torch.zeros(3, 4, 8, device=device),
            torch.zeros(3, 2, device=device),
            torch.ones(3, dtype=torch.int32, device=device),
            torch.arange(4, dtype=torch.int32, device=device),
            num_kv_heads=2,
            block_size=16,
            spec=SelectionSpec(),
        )


@pytest.mark.gpu
def test_full_size_selection_on_gpu(make_batch) -> None:
    # 32k-token decode context and a 256-token prefill chunk: 512 blocks of 64, top-32.
    b = make_batch([32768, 2000], [1, 256], hq=32, hkv=4, d=128, page=64, dtype=torch.bfloat16)
    res = full_attention(*b.paged, max_query_len=256)
    assert res.block_lse is not None
    spec = SelectionSpec(topk_blocks=32)
    got = select_blocks(
        res.block_lse,
        res.lse,
        b.seq_lens,
        b.query_start_loc,
        num_kv_heads=4,
        block_size=64,
        spec=spec,
    )
    scores = scores_from_block_lse(
        res.block_lse, res.lse, b.positions, block_size=64, num_kv_heads=4
    )
    want = select_blocks_reference(scores, b.positions, block_size=64, spec=spec)
    assert torch.equal(got, want)
