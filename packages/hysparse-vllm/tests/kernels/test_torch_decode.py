"""The vectorised PyTorch decode ops (the CPU path) against the reference."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.kernels import (
    SelectionSpec,
    full_attention_reference,
    pack_paged,
    select_blocks_reference,
    sparse_attention_reference,
    token_positions,
)
from hysparse_vllm.kernels.torch_decode import full_decode_torch, sparse_decode_torch


@pytest.mark.parametrize(
    ("g", "dtype", "agg"),
    [(1, torch.float32, "sum"), (4, torch.float32, "max"), (8, torch.bfloat16, "sum")],
)
def test_decode_ops_match_reference(g: int, dtype: torch.dtype, agg: str) -> None:
    gen = torch.Generator().manual_seed(g)
    hkv, d, page = 2, 64, 16
    lens = [100, 7, 64, 33]
    keys = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lens]
    kc, vc, bt, sl = pack_paged(keys, values, page, extra_pages=2, generator=gen)
    q = torch.randn(4, g * hkv, d, generator=gen).to(dtype)
    qsl = torch.arange(5, dtype=torch.int32)
    ref_out, ref_scores = full_attention_reference(q, kc, vc, bt, sl, qsl, score_agg=agg)
    out, scores = full_decode_torch(q, kc, vc, bt, sl, score_agg=agg)
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    assert scores is not None
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)
    _, pos = token_positions(sl, qsl)
    sel = select_blocks_reference(
        ref_scores, pos, block_size=page, spec=SelectionSpec(topk_blocks=3)
    )
    want = sparse_attention_reference(q, kc, vc, bt, sl, qsl, sel)
    torch.testing.assert_close(
        sparse_decode_torch(q, kc, vc, bt, sl, sel).float(), want.float(), **tol
    )
