"""``HySparseConfig``: a Llama/Qwen2-style decoder plus the HySparse layer pattern and knobs.

The HySparse fields are validated by a pydantic model (:class:`HySparseSettings`) so that a bad
checkpoint fails at load time with a message that names the field, the value and the fix,
instead of deep inside an attention kernel. Defaults follow ``shared/papers/hysparse.md``; every
choice the paper leaves open is a field here and is documented in the package README.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import LlamaConfig

GATE_TYPES = ("sigmoid_head",)
SCORE_AGGS = ("sum", "max")
QUERY_AGGS = ("per_token",)


class HySparseSettings(BaseModel):
    """The HySparse part of the config, checked on its own (pydantic at the edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_hidden_layers: int = Field(gt=0, description="Decoder layers in the model.")
    full_attention_layers: list[int] = Field(
        description="Indices of the full-attention layers; every other layer is sparse and "
        "reads the blocks and KV of the most recent full layer before it."
    )
    block_size: int = Field(gt=0, description="Tokens per selection block (B).")
    topk_blocks: int = Field(
        gt=0, description="Blocks a sparse query reads, forced ones included (K)."
    )
    sink_blocks: int = Field(ge=0, description="Leading blocks always selected (S).")
    swa_window: int = Field(
        gt=0, description="Tokens the sliding-window branch sees, itself included."
    )
    score_agg: Literal["sum", "max"] = Field(
        description="How the G heads of a KV group combine block mass."
    )
    query_agg: Literal["per_token"] = Field(
        description="Selection granularity over the queries of a step."
    )
    gate_type: Literal["sigmoid_head"] = Field(
        description="How the sparse and SWA branches are fused."
    )
    max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> HySparseSettings:
        n = self.num_hidden_layers
        full = self.full_attention_layers
        if not full:
            raise ValueError(
                "full_attention_layers is empty: HySparse needs at least one full layer"
            )
        if sorted(set(full)) != full:
            raise ValueError(f"full_attention_layers ({full}) must be strictly increasing")
        if full[0] < 0 or full[-1] >= n:
            raise ValueError(f"full_attention_layers ({full}) must lie in [0, {n - 1}]")
        if full[0] != 0:
            raise ValueError(
                f"layer 0 is sparse but no full layer precedes it (full_attention_layers={full}); "
                "a sparse layer reads the KV and block selection of an earlier full layer, so "
                "make layer 0 a full layer"
            )
        forced = self.sink_blocks + 1
        if self.topk_blocks < forced:
            raise ValueError(
                f"topk_blocks ({self.topk_blocks}) must be >= sink_blocks + 1 ({forced}): K counts "
                "the sink blocks and the query's own block; raise topk_blocks or lower sink_blocks"
            )
        covered = self.topk_blocks * self.block_size
        if covered > self.max_position_embeddings:
            raise ValueError(
                f"topk_blocks * block_size ({self.topk_blocks} * {self.block_size} = {covered}) "
                f"exceeds the context (max_position_embeddings={self.max_position_embeddings}): "
                "every sparse layer would be dense; lower topk_blocks"
            )
        return self


def _first_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


class HySparseConfig(LlamaConfig):  # type: ignore[no-untyped-call]
    """A Llama-shaped decoder in which most layers are HySparse sparse layers.

    Layer ``i`` is *full* if ``i in full_attention_layers``: ordinary causal attention with its
    own q/k/v projections and KV cache, which also emits per-block attention mass. Any other
    layer is *sparse*: its own q projection feeds (a) a sparse branch over the KV of its source
    full layer (the most recent full layer before it) restricted to the top-``topk_blocks``
    blocks that full layer attended to, and (b) a sliding-window branch with its own k/v
    projections and a ``swa_window``-token KV cache; a per-head sigmoid gate of the layer input
    fuses them: ``out_h = g_h * sparse_h + (1 - g_h) * swa_h``.

    ``qkv_bias`` (Qwen2 style) overrides ``attention_bias`` for q/k/v only; ``o_proj`` keeps
    ``attention_bias``. Only the default RoPE is supported.
    """

    model_type = "hysparse"

    full_attention_layers: list[int] | None = None
    block_size: int = 64
    topk_blocks: int = 16
    sink_blocks: int = 1
    swa_window: int = 128
    score_agg: str = "sum"
    query_agg: str = "per_token"
    gate_type: str = "sigmoid_head"
    qkv_bias: bool | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.full_attention_layers is None:
            self.full_attention_layers = [0]
        super().__post_init__(**kwargs)  # type: ignore[no-untyped-call]
        self.hysparse_settings()  # validate now: fail at load, not at first forward
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type != "default":
            raise ValueError(
                f"HySparseConfig supports only the default RoPE, got rope_type={rope_type!r}; "
                "convert a checkpoint without RoPE scaling"
            )

    def hysparse_settings(self) -> HySparseSettings:
        """The validated HySparse fields; raises ``ValueError`` naming the bad field."""
        try:
            return HySparseSettings(
                num_hidden_layers=self.num_hidden_layers,
                full_attention_layers=list(self.full_attention_layers or []),
                block_size=self.block_size,
                topk_blocks=self.topk_blocks,
                sink_blocks=self.sink_blocks,
                swa_window=self.swa_window,
                score_agg=self.score_agg,
                query_agg=self.query_agg,
                gate_type=self.gate_type,
                max_position_embeddings=self.max_position_embeddings,
            )
        except ValidationError as err:
            raise ValueError(f"invalid HySparseConfig: {_first_error(err)}") from None

    # -- typed views of fields transformers declares optional --------------------------------
    @property
    def dim(self) -> int:
        """head_dim (LlamaConfig fills it in ``__post_init__``)."""
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(self.num_key_value_heads or self.num_attention_heads)

    # -- the layer pattern, as the model code reads it -------------------------------------
    def is_full_layer(self, layer: int) -> bool:
        return layer in (self.full_attention_layers or [])

    def source_full_layer(self, layer: int) -> int:
        """The full layer whose KV and block selection sparse layer ``layer`` reads."""
        return max(f for f in (self.full_attention_layers or [0]) if f <= layer)

    @property
    def rope_theta_value(self) -> float:
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0
        return float(theta or 10000.0)

    @property
    def qkv_has_bias(self) -> bool:
        return bool(self.attention_bias if self.qkv_bias is None else self.qkv_bias)


def parse_pattern(spec: str, num_layers: int) -> list[int]:
    """Turn a pattern spec into full-layer indices.

    ``"1:4"`` means one full layer then four sparse layers, repeated (full at 0, 5, 10, ...);
    ``"0,6,12"`` lists the full layers explicitly; ``"all"`` makes every layer full (dense).
    """
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if ":" in spec:
        a, _, b = spec.partition(":")
        try:
            n_full, n_sparse = int(a), int(b)
        except ValueError:
            raise ValueError(f"pattern {spec!r}: expected FULL:SPARSE such as '1:4'") from None
        if n_full < 1 or n_sparse < 0:
            raise ValueError(f"pattern {spec!r}: need FULL >= 1 and SPARSE >= 0")
        period = n_full + n_sparse
        return [i for i in range(num_layers) if i % period < n_full]
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(
            f"pattern {spec!r}: expected 'FULL:SPARSE' (e.g. '1:4'), 'all', or a comma list of "
            "full layer indices (e.g. '0,6,12')"
        ) from None
    return layers
