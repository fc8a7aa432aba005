"""Fixtures of the kernel tests: Triton's mode, the device, and a paged-batch factory.

Without CUDA the Triton kernels run in Triton's CPU interpreter; the mode must be chosen
before the kernel modules are imported (Triton reads it when a kernel is defined), so it is set
here, at collection. With CUDA the same small tests run compiled on the GPU, and the ``gpu``
marked tests add full sizes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the mode when it defines its own jitted helpers (tl.cdiv...), at import
        raise RuntimeError(
            "Triton was imported before the kernel tests could choose its CPU interpreter "
            "(something collected earlier imports vLLM or Triton at module level); set "
            "TRITON_INTERPRET=1 in the environment, or import those lazily"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hysparse_vllm.kernels import pack_paged, token_positions
from hysparse_vllm.kernels._triton_common import interpreting


@dataclass
class Batch:
    """A paged varlen batch: query tokens of every sequence end to end, K/V in shuffled pages."""

    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    positions: torch.Tensor
    max_query_len: int

    @property
    def paged(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments every kernel and reference takes, in order."""
        return (
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_table,
            self.seq_lens,
            self.query_start_loc,
        )


MakeBatch = Callable[..., Batch]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels run: the GPU if there is one, else the CPU interpreter."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set before import)")
    return torch.device("cpu")


@pytest.fixture
def make_batch(device: torch.device) -> MakeBatch:
    """``make_batch(kv_lens, q_lens, hq=, hkv=, d=, page=, dtype=, seed=)`` -> :class:`Batch`.

    Sequence ``s`` has ``kv_lens[s]`` tokens in the cache, the last ``q_lens[s]`` of which are
    this step's queries (``q_lens[s] == 1``: decode; ``== kv_lens[s]``: a first prefill chunk;
    in between: a chunked prefill with context).
    """

    def make(
        kv_lens: list[int],
        q_lens: list[int],
        *,
        hq: int,
        hkv: int,
        d: int,
        page: int = 16,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        extra_pages: int = 3,
    ) -> Batch:
        g = torch.Generator().manual_seed(seed)
        keys = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in kv_lens]
        values = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in kv_lens]
        kc, vc, bt, sl = pack_paged(keys, values, page, extra_pages=extra_pages, generator=g)
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(int(qsl[-1]), hq, d, generator=g).to(dtype)
        _, pos = token_positions(sl, qsl)
        return Batch(
            q.to(device),
            kc.to(device),
            vc.to(device),
            bt.to(device),
            sl.to(device),
            qsl.to(device),
            pos.to(device),
            max(q_lens),
        )

    return make


# Tolerances of the kernels against the fp32 PyTorch reference. fp32: the kernels accumulate in
# fp32 in another order. bf16: the reference computes in fp32 from the same bf16 inputs; the
# kernels round the probabilities to bf16 for the P.V product (as FlashAttention does) and the
# output to bf16, so up to about 2 bf16 ulps of an O(1) output.
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(scope="session")
def tol() -> dict[torch.dtype, dict[str, float]]:
    """Output tolerances per dtype (see ``TOL``)."""
    return TOL
