"""The HySparse selection contract in plain PyTorch: block mass, head aggregation, top-k.

These functions are the single statement of the contract shared by the reference model, the
vLLM CPU backend and (as their oracle) the kernels:

1. A full layer's attention probabilities ``p[h, q, t]`` (causal softmax) are summed per block
   of ``block_size`` tokens: ``m[h, q, b]``.
2. The G query heads of a KV group combine by ``"sum"`` or ``"max"``: ``s[g, q, b]``.
3. Query ``q`` may pick blocks ``0 .. q // B``. The sink blocks ``0 .. S-1`` (those that exist)
   and the query's own block are forced. If there are at most ``K`` candidates, all are taken;
   otherwise the other ``K - |forced|`` slots go to the highest scores, ties to the lower block
   index. The result is sorted ascending and padded with ``-1`` to ``K``.
"""

from __future__ import annotations

import torch


def block_mass(probs: torch.Tensor, block_size: int, num_blocks: int | None = None) -> torch.Tensor:
    """Sum attention probabilities ``[..., T_kv]`` into blocks: ``[..., num_blocks]``."""
    t_kv = probs.shape[-1]
    nb = -(-t_kv // block_size) if num_blocks is None else num_blocks
    pad = nb * block_size - t_kv
    if pad < 0:
        raise ValueError(f"num_blocks ({nb}) * block_size ({block_size}) < keys ({t_kv})")
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    return probs.reshape(*probs.shape[:-1], nb, block_size).sum(-1)


def aggregate_heads(
    mass: torch.Tensor, num_kv_heads: int, agg: str, head_dim: int = -3
) -> torch.Tensor:
    """Combine the G query heads of each KV group (heads on axis ``head_dim``, group-major)."""
    dim = head_dim % mass.dim()
    hq = mass.shape[dim]
    if hq % num_kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({num_kv_heads})")
    shape = (*mass.shape[:dim], num_kv_heads, hq // num_kv_heads, *mass.shape[dim + 1 :])
    grouped = mass.reshape(shape)
    if agg == "sum":
        return grouped.sum(dim + 1)
    if agg == "max":
        return grouped.amax(dim + 1)
    raise ValueError(f"score_agg must be 'sum' or 'max', got {agg!r}")


def select_blocks(
    scores: torch.Tensor,
    query_pos: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    sink_blocks: int,
) -> torch.Tensor:
    """Top-k block indices per query, by the contract above.

    ``scores`` is ``[..., NB]`` (NB >= the number of candidates of every query; entries past a
    query's own block are ignored), ``query_pos`` broadcasts to ``scores.shape[:-1]``. Returns
    int64 ``[..., topk]``, ascending, ``-1`` padded.
    """
    nb = scores.shape[-1]
    idx = torch.arange(nb, device=scores.device)
    own = torch.div(query_pos, block_size, rounding_mode="floor").unsqueeze(-1)
    cand = idx <= own
    forced = cand & ((idx < sink_blocks) | (idx == own))
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=scores.device)
    key = torch.where(forced, inf, torch.where(cand, scores.float(), -inf))
    # A stable descending sort keeps equal scores in index order: ties go to the lower block.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :topk]
    taken = torch.gather(key, -1, order) > -inf
    picked = torch.where(taken, order, torch.full_like(order, nb))
    picked = torch.sort(picked, dim=-1).values
    picked = torch.where(picked == nb, torch.full_like(picked, -1), picked)
    if picked.shape[-1] < topk:
        pad = torch.full((*picked.shape[:-1], topk - picked.shape[-1]), -1, dtype=picked.dtype)
        picked = torch.cat([picked, pad.to(picked.device)], dim=-1)
    return picked


def selected_block_mask(sel: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[..., K]`` block indices (``-1`` padded) -> boolean ``[..., num_blocks]``."""
    onehot = torch.zeros((*sel.shape[:-1], num_blocks + 1), dtype=torch.bool, device=sel.device)
    onehot.scatter_(-1, torch.where(sel < 0, num_blocks, sel), True)
    return onehot[..., :num_blocks]
