# ruff: noqa: ANN001  (Triton infers kernel argument types at launch: pointers, ints, floats)
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton helpers shared by the kernels: launch facts, the varlen sequence lookup, the MMA
wrapper that keeps the CPU interpreter exact, and the split-KV merge."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# Triton decides at decoration time (when the kernel modules are imported, right after this one)
# whether a kernel is compiled or interpreted, so the mode is captured once here.
_INTERPRET = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True if the kernels were defined under ``TRITON_INTERPRET=1`` (the CPU test mode)."""
    return _INTERPRET


def require_triton_device(t: torch.Tensor) -> None:
    """Triton kernels run on CUDA, or anywhere under the interpreter; say so otherwise."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the HySparse Triton kernels need CUDA tensors (got {t.device}); on CPU use "
            "hysparse_vllm.kernels.reference, or set TRITON_INTERPRET=1 before importing triton "
            "(slow; for tests)"
        )


def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """Constexpr flags for ``_mma``.

    The interpreter multiplies bf16 tiles wrongly (it feeds raw bits to numpy), so there the
    operands are widened to fp32 first; this is exact for bf16/fp16 inputs. fp32 inputs use IEEE
    fp32 products rather than TF32, so the fp32 tests can hold tight tolerances on a GPU too.
    """
    return {"DOT_FP32": interpreting(), "IEEE": dtype == torch.float32}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere), for split heuristics."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def launch_opts(num_warps: int | None, num_stages: int | None) -> dict[str, int]:
    """Triton launch knobs, passed only when set (the benchmark sweeps them on a GPU)."""
    opts = {}
    if num_warps is not None:
        opts["num_warps"] = num_warps
    if num_stages is not None:
        opts["num_stages"] = num_stages
    return opts


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _mma(a, b, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _find_seq(qsl_ptr, tok, num_seqs):
    """Largest s with query_start_loc[s] <= tok (skips empty sequences): binary search."""
    lo = 0
    hi = num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) <= tok:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # [SPLITS, T, Hq, D] fp32, each split normalised by its own sum
    part_lse_ptr,  # [SPLITS, T, Hq] fp32, log2 units, -inf for an empty split
    out_ptr,  # [T, Hq, D]
    lse_ptr,  # [T, Hq] fp32, natural-log units
    stride_ot,
    stride_oh,
    num_tokens,
    num_heads,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    tok = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    row = tok * num_heads + h
    plane = num_tokens * num_heads
    lse_s = tl.load(part_lse_ptr + sp * plane + row, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    w = tl.exp2(lse_s - m)
    total = tl.sum(w, 0)
    o = tl.load(
        part_out_ptr + (sp[:, None] * plane + row) * HEAD_DIM + d[None, :],
        mask=(sp[:, None] < SPLITS) & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    merged = tl.sum(o * (w / total)[:, None], 0)
    tl.store(
        out_ptr + tok * stride_ot + h * stride_oh + d,
        merged.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )
    tl.store(lse_ptr + row, (m + tl.log2(total)) * 0.6931471805599453)


def merge_splits(
    part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Combine split-KV partial results (log-sum-exp merge) into ``out`` and ``lse``."""
    splits, num_tokens, num_heads, head_dim = part_out.shape
    if num_tokens == 0:
        return
    _merge_splits_kernel[(num_tokens, num_heads)](
        part_out,
        part_lse,
        out,
        lse,
        out.stride(0),
        out.stride(1),
        num_tokens,
        num_heads,
        HEAD_DIM=head_dim,
        D_PAD=max(16, next_pow2(head_dim)),
        SPLITS=splits,
        SPLITS_PAD=max(2, next_pow2(splits)),
    )
