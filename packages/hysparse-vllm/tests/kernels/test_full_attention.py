"""Fused full-layer attention with block statistics against the PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hysparse_vllm.kernels import full_attention, full_attention_reference, scores_from_block_lse
from hysparse_vllm.kernels.layout import gather_sequence

# (G, head_dim, dtype, page): every GQA ratio, both head dims and both dtypes appear.
CASES = [
    (1, 64, torch.float32, 16),
    (4, 128, torch.bfloat16, 16),
    (8, 64, torch.bfloat16, 32),
    (4, 64, torch.float32, 32),
]


def _case_id(case: tuple[int, int, torch.dtype, int]) -> str:
    g, d, dt, page = case
    return f"G{g}-d{d}-{str(dt).split('.')[-1]}-page{page}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mixed_batch_matches_reference(case, make_batch, tol) -> None:
    g, d, dtype, page = case
    hkv = 2 if g < 8 else 1
    # A first prefill chunk with a partial last page, a decode token, and a chunked prefill
    # whose context ends mid-page: odd lengths everywhere.
    b = make_batch(
        [37, 45, 2 * page + 3], [37, 1, 9], hq=g * hkv, hkv=hkv, d=d, page=page, dtype=dtype
    )
    res = full_attention(*b.paged, max_query_len=b.max_query_len)
    ref_out, ref_scores = full_attention_reference(*b.paged)
    torch.testing.assert_close(res.out.float(), ref_out.float(), **tol[dtype])
    assert res.block_lse is not None
    scores = scores_from_block_lse(
        res.block_lse, res.lse, b.positions, block_size=page, num_kv_heads=hkv
    )
    # Logits come from the same inputs in fp32 on both sides, so scores are tight in bf16 too.
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("agg", ["sum", "max"])
def test_lse_and_max_aggregation(agg: str, make_batch) -> None:
    b = make_batch([40, 21], [12, 1], hq=8, hkv=2, d=64)
    res = full_attention(*b.paged, max_query_len=b.max_query_len)
    _, ref_scores = full_attention_reference(*b.paged, score_agg=agg)
    assert res.block_lse is not None
    scores = scores_from_block_lse(
        res.block_lse, res.lse, b.positions, block_size=16, num_kv_heads=2, score_agg=agg
    )
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)
    # The row log-sum-exp is the softmax normaliser: check it against the dense logits.
    k = gather_sequence(b.key_cache, b.block_table, 0, 40).float().repeat_interleave(4, 1)
    logits = torch.einsum("thd,shd->ths", b.q[:12].float(), k) / 8.0  # scale 1/sqrt(64)
    visible = torch.arange(40, device=k.device)[None, None, :] <= b.positions[:12, None, None]
    want = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), -1)
    torch.testing.assert_close(res.lse[:12], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3])
def test_decode_split_kv_equals_unsplit(splits: int, make_batch) -> None:
    b = make_batch([70, 5, 33], [1, 1, 1], hq=8, hkv=2, d=64)
    one = full_attention(*b.paged, max_query_len=1, num_splits=1)
    many = full_attention(*b.paged, max_query_len=1, num_splits=splits)
    torch.testing.assert_close(many.out, one.out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(many.lse, one.lse, atol=1e-6, rtol=1e-6)
    assert many.block_lse is not None
    assert one.block_lse is not None
    own = (b.positions // 16)[:, None, None]
    written = torch.arange(b.block_table.shape[1], device=own.device)[None, None, :] <= own
    written = written.expand_as(one.block_lse)
    assert torch.equal(many.block_lse[written], one.block_lse[written])


def test_without_scores_gives_the_same_output(make_batch) -> None:
    b = make_batch([50, 19], [20, 1], hq=4, hkv=1, d=64, dtype=torch.bfloat16)
    with_s = full_attention(*b.paged, max_query_len=20)
    without = full_attention(*b.paged, max_query_len=20, with_scores=False)
    assert without.block_lse is None
    torch.testing.assert_close(without.out.float(), with_s.out.float(), atol=8e-3, rtol=1e-2)


@pytest.mark.parametrize("block_m", [16, 32])
def test_prefill_tile_rows_do_not_change_the_result(block_m: int, make_batch) -> None:
    # G=3 (as in SmolLM2): tiles hold block_m // 3 tokens and leave rows empty.
    b = make_batch([45, 30], [45, 7], hq=6, hkv=2, d=64)
    base = full_attention(*b.paged, max_query_len=45)
    res = full_attention(*b.paged, max_query_len=45, block_m=block_m)
    torch.testing.assert_close(res.out, base.out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.lse, base.lse, atol=1e-6, rtol=1e-6)
    ref_out, _ = full_attention_reference(*b.paged)
    torch.testing.assert_close(res.out, ref_out, atol=2e-5, rtol=2e-5)


def test_prefill_rejects_splits(make_batch) -> None:
    b = make_batch([20], [20], hq=2, hkv=1, d=64)
    with pytest.raises(ValueError, match="num_splits"):
        full_attention(*b.paged, max_query_len=20, num_splits=2)
    with pytest.raises(ValueError, match=r"block_m \(24\) must be a power of two"):
        full_attention(*b.paged, max_query_len=20, block_m=24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_on_gpu(dtype: torch.dtype, make_batch, tol) -> None:
    # Real sizes: page 64, GQA 8, head_dim 128, mixed 4k/1k sequences with a 512-token chunk.
    b = make_batch(
        [4096, 1031, 2600, 777], [1, 512, 1, 300], hq=32, hkv=4, d=128, page=64, dtype=dtype
    )
    res = full_attention(*b.paged, max_query_len=512)
    ref_out, ref_scores = full_attention_reference(*b.paged)
    torch.testing.assert_close(res.out.float(), ref_out.float(), **tol[dtype])
    assert res.block_lse is not None
    scores = scores_from_block_lse(
        res.block_lse, res.lse, b.positions, block_size=64, num_kv_heads=4
    )
    torch.testing.assert_close(scores, ref_scores, atol=2e-5, rtol=1e-3)


def test_empty_batch_returns_empty_results(make_batch) -> None:
    b = make_batch([20, 9], [1, 1], hq=4, hkv=1, d=64)
    no_queries = torch.zeros(3, dtype=torch.int32, device=b.q.device)
    res = full_attention(b.q[:0], *b.paged[1:5], no_queries, max_query_len=0)
    assert res.out.shape == (0, 4, 64)
    assert res.block_lse is not None
    assert res.block_lse.shape == (0, 4, b.block_table.shape[1])


def test_cpu_tensors_without_the_interpreter_get_a_clear_error() -> None:
    # A separate interpreter: Triton's mode is fixed when the kernels are first imported.
    code = (
        "import torch\n"
        "from hysparse_vllm.kernels import full_attention\n"
        "z = torch.zeros\n"
        "i = torch.int32\n"
        "try:\n"
        "    full_attention(z(1, 2, 16), z(1, 16, 1, 16), z(1, 16, 1, 16), z(1, 1, dtype=i),\n"
        "                   torch.ones(1, dtype=i), torch.tensor([0, 1], dtype=i))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "need CUDA tensors" in done.stdout, done.stdout + done.stderr
    assert "hysparse_vllm.kernels.reference" in done.stdout
