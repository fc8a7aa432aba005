"""The HySparse attention backend for vLLM's CPU engine: backend, metadata builder, impl.

One backend serves both roles, chosen per layer by whether the layer shares KV:

* a **full layer** (owns its cache) runs vLLM's CPU attention unchanged, and on request
  (:meth:`HySparseAttentionImpl.select`) turns its own attention into per-query, per-KV-group
  block selections;
* a **sparse branch** (``kv_sharing_target_layer_name`` = its full layer, so it allocates no
  cache and writes none) attends over the full layer's paged cache restricted to those blocks
  (:meth:`HySparseAttentionImpl.sparse_forward`).

The selection travels between them as a tensor through two custom ops (``vllm_ops``), i.e. as
per-forward data in the decoder loop, never as state on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from .cpu_gather import (
    RequestSpan,
    SelectionParams,
    gather_context,
    select_for_request,
    sparse_gather_rows,
    sparse_masked,
)

# A request with at most this many query rows takes the block-gather path (decode, short
# chunks); longer ones gather their context once and mask it.
GATHER_MAX_QUERIES = 8


class UnsupportedKVLayout(RuntimeError):
    """vLLM's CPU attention chose a KV-cache layout (its ISA: ``amx`` on Sapphire Rapids in
    bf16) that the HySparse gather does not read. vLLM picks the ISA per layer at run time, so
    this is found at the first forward, and refused there rather than read wrong."""


class HySparseAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention plus HySparse selection and sparse gather (capabilities)."""

    SUPPORTED_ISAS = ("vec",)

    @staticmethod
    def get_impl_cls() -> type[HySparseAttentionImpl]:
        return HySparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HySparseMetadataBuilder]:
        return HySparseMetadataBuilder

    @classmethod
    def unsupported_reasons(
        cls, *, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str, isa: str | None = None
    ) -> list[str]:
        """Why this backend cannot run a configuration (empty list: it can)."""
        reasons = []
        if head_dim not in cls.get_supported_head_sizes() or head_dim % 32:
            sizes = [s for s in cls.get_supported_head_sizes() if s % 32 == 0]
            reasons.append(
                f"head_dim {head_dim} is not supported by the HySparse CPU backend "
                f"(supported: {sizes})"
            )
        if dtype not in cls.supported_dtypes:
            reasons.append(f"dtype {dtype} is not supported (use float32, bfloat16 or float16)")
        if kv_cache_dtype != "auto":
            reasons.append(
                f"kv_cache_dtype {kv_cache_dtype!r} is not supported: the sparse gather reads "
                "an unquantised cache; use kv_cache_dtype='auto'"
            )
        if isa is not None and (reason := cls.isa_reason(isa)) is not None:
            reasons.append(reason)
        return reasons

    @classmethod
    def isa_reason(cls, isa: str) -> str | None:
        """Why the gather cannot read the KV layout of CPU attention ISA ``isa`` (None: it can)."""
        if isa in cls.SUPPORTED_ISAS:
            return None
        return (
            f"CPU attention ISA {isa!r} stores KV in a layout the HySparse gather does not "
            f"read (supported: {list(cls.SUPPORTED_ISAS)}); on AMX machines use float32"
        )


def check_isa(layer: Any) -> None:
    """Raise :class:`UnsupportedKVLayout` if ``layer``'s CPU attention ISA is not readable."""
    reason = HySparseAttentionBackend.isa_reason(getattr(layer, "isa", "vec"))
    if reason is not None:
        raise UnsupportedKVLayout(reason)


@dataclass
class HySparseMetadata(CPUAttentionMetadata):
    """CPU metadata plus each request's rows and context length, as Python ints."""

    spans: list[RequestSpan] = field(default_factory=list)


class HySparseMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> HySparseMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        qsl = common_attn_metadata.query_start_loc_cpu.tolist()
        seq_lens = common_attn_metadata.seq_lens.cpu().tolist()
        spans = [
            RequestSpan(qsl[i], qsl[i + 1], seq_lens[i])
            for i in range(common_attn_metadata.num_reqs)
        ]
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        return HySparseMetadata(**fields, spans=spans)


class HySparseAttentionImpl(CPUAttentionBackendImpl):
    """Full layers: CPU attention + :meth:`select`. Sparse branches: :meth:`sparse_forward`."""

    def __init__(self, *args: Any, hysparse: SelectionParams | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if hysparse is None:
            raise ValueError("HySparseAttentionImpl needs hysparse=SelectionParams(...)")
        self.params = hysparse

    def forward(self, layer: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kv_sharing_target_layer_name is not None:
            raise RuntimeError(
                "a HySparse sparse branch needs its full layer's block selection; call it "
                "through torch.ops.hysparse.sparse_attention, not Attention.forward"
            )
        return super().forward(layer, query, *args, **kwargs)

    def select(
        self,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: HySparseMetadata | None,
        out: torch.Tensor,
    ) -> None:
        """Write the block selection of every query row into ``out`` ``[T, Hkv, K]``."""
        out.fill_(-1)
        if md is None or kv_cache.numel() == 0:  # profiling / warm-up run
            return
        check_isa(layer)
        for r, span in enumerate(md.spans):
            if span.end <= span.start:
                continue
            k, _ = gather_context(kv_cache, md.block_table[r], span.seq_len)
            out[span.start : span.end] = select_for_request(
                query[span.start : span.end], k, span.first_pos, self.scale, self.params
            )

    def sparse_forward(
        self,
        layer: Any,
        query: torch.Tensor,
        selection: torch.Tensor,
        kv_cache: torch.Tensor,
        md: HySparseMetadata | None,
        output: torch.Tensor,
    ) -> None:
        """Sparse branch of every query row into ``output`` ``[T, Hq, D]``."""
        if md is None or kv_cache.numel() == 0:
            output.zero_()
            return
        check_isa(layer)
        b = self.params.block_size
        rows: list[int] = []  # decode-like rows of every request: one gather call for all
        row_req: list[int] = []
        row_pos: list[int] = []
        for r, span in enumerate(md.spans):
            s, e = span.start, span.end
            if e <= s:
                continue
            if e - s <= GATHER_MAX_QUERIES:
                rows.extend(range(s, e))
                row_req.extend([r] * (e - s))
                row_pos.extend(range(span.first_pos, span.seq_len))
            else:
                k, v = gather_context(kv_cache, md.block_table[r], span.seq_len)
                output[s:e] = sparse_masked(
                    query[s:e], k, v, selection[s:e], span.first_pos, self.scale, b
                )
        if rows:
            idx = torch.tensor(rows)
            output[idx] = sparse_gather_rows(
                query[idx],
                kv_cache,
                md.block_table[torch.tensor(row_req)],
                torch.tensor(row_pos),
                selection[idx],
                self.scale,
                b,
            )
