"""The selection contract on hand-checkable cases (pure PyTorch, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.selection import aggregate_heads, block_mass, select_blocks, selected_block_mask


def sel(scores: list[float], q: int, *, b: int = 4, k: int = 3, s: int = 1) -> list[int]:
    out = select_blocks(
        torch.tensor([scores]), torch.tensor([q]), block_size=b, topk=k, sink_blocks=s
    )
    return out[0].tolist()


def test_fewer_candidates_than_k_takes_all_and_pads():
    # q=5, B=4: candidates are blocks 0 and 1 only; block 2/3 scores must be ignored.
    assert sel([0.1, 0.2, 9.0, 9.0], 5) == [0, 1, -1]


def test_sink_and_own_block_forced_even_with_low_scores():
    # q=19 -> own block 4; sink block 0. One free slot goes to the best of blocks 1..3.
    assert sel([0.0, 0.3, 0.5, 0.2, 0.0], 19) == [0, 2, 4]


def test_ties_go_to_lower_block_index():
    assert sel([0.0, 0.5, 0.5, 0.5, 0.0], 19) == [0, 1, 4]
    assert sel([0.0, 0.1, 0.5, 0.5, 0.0], 19, k=4) == [0, 2, 3, 4]


def test_no_sink_blocks_and_multiple_sinks():
    assert sel([0.9, 0.3, 0.5, 0.2, 0.0], 19, s=0, k=2) == [0, 4]
    assert sel([0.0, 0.0, 0.5, 0.9, 0.0], 19, s=2, k=4) == [0, 1, 3, 4]


def test_output_sorted_ascending_and_k_counts_forced():
    torch.manual_seed(0)
    scores = torch.rand(50, 40)
    q = torch.randint(0, 40 * 8, (50,))
    out = select_blocks(scores, q, block_size=8, topk=6, sink_blocks=1)
    for row, qq in zip(out.tolist(), q.tolist(), strict=False):
        valid = [b for b in row if b >= 0]
        assert valid == sorted(valid)
        assert len(valid) == min(6, qq // 8 + 1)
        assert 0 in valid
        assert qq // 8 in valid
        assert row[len(valid) :] == [-1] * (6 - len(valid))


def test_block_mass_and_head_aggregation():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.0, 0.0, 0.25, 0.25]])  # 2 heads
    mass = block_mass(probs, 2)
    assert torch.allclose(mass, torch.tensor([[0.3, 0.7, 0.0], [0.5, 0.25, 0.25]]))
    both = mass.unsqueeze(0)  # [1 (head axis after), ...] -> heads on axis 1
    assert torch.allclose(
        aggregate_heads(both, 1, "sum", head_dim=1), torch.tensor([[[0.8, 0.95, 0.25]]])
    )
    assert torch.allclose(
        aggregate_heads(both, 1, "max", head_dim=1), torch.tensor([[[0.5, 0.7, 0.25]]])
    )
    with pytest.raises(ValueError, match="score_agg"):
        aggregate_heads(both, 1, "mean", head_dim=1)


def test_selected_block_mask_ignores_padding():
    m = selected_block_mask(torch.tensor([[0, 2, -1]]), 4)
    assert m.tolist() == [[True, False, True, False]]
