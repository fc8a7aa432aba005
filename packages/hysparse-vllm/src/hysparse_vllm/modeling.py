"""Reference HySparse model in plain PyTorch (transformers-compatible): the oracle.

It states the maths, not speed: no KV cache (``generate`` recomputes the whole sequence each
step), whole-sequence masks, fp32 softmax. Every fast path (the vLLM backend, the kernels) is
tested against it.

Per forward pass the decoder loop carries one :class:`SharedKV` from each full layer to the
sparse layers after it: the full layer's post-RoPE K/V and the block selection made from its
own attention probabilities. That is per-forward data, passed down the loop, not global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import HySparseConfig
from .selection import aggregate_heads, block_mass, select_blocks, selected_block_mask


# ----------------------------------------------------------------------------------------------
# The maths, as functions of whole sequences (batch b, heads H, tokens T, head_dim D).
# ----------------------------------------------------------------------------------------------
def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (NeoX-style, half-split) RoPE tables ``[T, D]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over allowed keys. q ``[b,Hq,T,D]``, k/v ``[b,Hkv,S,D]``, mask ``[b|1,Hq|1,T,S]``.

    Returns (output ``[b,Hq,T,D]``, probabilities ``[b,Hq,T,S]`` in fp32).
    """
    groups = q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float(), _repeat_kv(k, groups).float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, _repeat_kv(v, groups).float())
    return out.to(q.dtype), probs


def causal_mask(t: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def window_mask(t: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Key ``s`` is visible to query ``q`` iff ``q - window < s <= q`` (``window`` keys)."""
    pos = torch.arange(t, device=device)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff < window)


def sparse_mask(sel: torch.Tensor, t: int, block_size: int) -> torch.Tensor:
    """Per (KV group, query) selected blocks ``[b,Hkv,T,K]`` -> key mask ``[b,Hkv,T,T]``."""
    nb = -(-t // block_size)
    blocks = selected_block_mask(sel, nb)  # [b,Hkv,T,NB]
    token_block = torch.arange(t, device=sel.device) // block_size
    return blocks[..., token_block] & causal_mask(t, sel.device)


def full_layer_selection(
    probs: torch.Tensor,
    num_kv_heads: int,
    *,
    block_size: int,
    topk: int,
    sink_blocks: int,
    agg: str,
) -> torch.Tensor:
    """Full-layer probabilities ``[b,Hq,T,T]`` -> selection ``[b,Hkv,T,K]`` (contract 1-3)."""
    t = probs.shape[-1]
    scores = aggregate_heads(block_mass(probs, block_size), num_kv_heads, agg, head_dim=1)
    return select_blocks(
        scores,
        torch.arange(t, device=probs.device),
        block_size=block_size,
        topk=topk,
        sink_blocks=sink_blocks,
    )


@dataclass(frozen=True)
class SharedKV:
    """What a full layer hands to the sparse layers after it in the same forward pass."""

    key: torch.Tensor  # [b, Hkv, T, D], post-RoPE
    value: torch.Tensor  # [b, Hkv, T, D]
    selection: torch.Tensor  # [b, Hkv, T, K] int64, -1 padded


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: HySparseConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class _AttentionBase(nn.Module):
    def __init__(self, config: HySparseConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.dim
        self.scale = self.head_dim**-0.5
        qkv_bias = config.qkv_has_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


class FullAttention(_AttentionBase):
    """Causal attention that also selects, per KV group and query, the blocks it attended to."""

    def __init__(self, config: HySparseConfig) -> None:
        super().__init__(config)
        kv = self.num_kv_heads * self.head_dim
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_has_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_has_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, SharedKV]:
        c = self.config
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        t = x.shape[1]
        out, probs = masked_attention(q, k, v, causal_mask(t, x.device), self.scale)
        sel = full_layer_selection(
            probs,
            self.num_kv_heads,
            block_size=c.block_size,
            topk=c.topk_blocks,
            sink_blocks=c.sink_blocks,
            agg=c.score_agg,
        )
        return self.o_proj(self._merge(out)), SharedKV(k, v, sel)


class SparseAttention(_AttentionBase):
    """Sparse branch over the source full layer's selected blocks + own sliding window, gated.

    No k/v projection for the sparse branch (it reads the full layer's K/V); ``swa_k_proj`` /
    ``swa_v_proj`` feed the sliding-window branch only. One query projection serves both
    branches. ``branch_gate`` gives a per-head sigmoid ``g``: ``out = g*sparse + (1-g)*swa``.
    """

    def __init__(self, config: HySparseConfig) -> None:
        super().__init__(config)
        kv = self.num_kv_heads * self.head_dim
        self.swa_k_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_has_bias)
        self.swa_v_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_has_bias)
        self.branch_gate = nn.Linear(config.hidden_size, self.num_heads, bias=True)

    def branches(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared: SharedKV
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sparse, swa, gate) before fusion: ``[b,Hq,T,D]``, ``[b,Hq,T,D]``, ``[b,Hq,T,1]``."""
        c = self.config
        t = x.shape[1]
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        groups = self.num_heads // self.num_kv_heads
        smask = _repeat_kv(sparse_mask(shared.selection, t, c.block_size), groups)
        sparse, _ = masked_attention(q, shared.key, shared.value, smask, self.scale)
        k = apply_rope(self._heads(self.swa_k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.swa_v_proj(x), self.num_kv_heads)
        swa, _ = masked_attention(q, k, v, window_mask(t, c.swa_window, x.device), self.scale)
        gate = torch.sigmoid(self.branch_gate(x).float()).transpose(1, 2).unsqueeze(-1)
        return sparse, swa, gate

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared: SharedKV
    ) -> torch.Tensor:
        sparse, swa, gate = self.branches(x, cos, sin, shared)
        fused = (gate * sparse.float() + (1 - gate) * swa.float()).to(x.dtype)
        out: torch.Tensor = self.o_proj(self._merge(fused))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: HySparseConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_full = config.is_full_layer(layer_idx)
        self.self_attn: FullAttention | SparseAttention = (
            FullAttention(config) if self.is_full else SparseAttention(config)
        )
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared: SharedKV | None
    ) -> tuple[torch.Tensor, SharedKV | None]:
        x = self.input_layernorm(h)
        if isinstance(self.self_attn, FullAttention):
            attn, shared = self.self_attn(x, cos, sin)
        else:
            if shared is None:  # the config forbids it; guard the invariant anyway
                raise RuntimeError("a sparse layer ran before any full layer")
            attn = self.self_attn(x, cos, sin, shared)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), shared


class HySparsePreTrainedModel(PreTrainedModel):  # type: ignore[no-untyped-call]
    config_class = HySparseConfig
    config: HySparseConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012  (transformers declares it per instance)
    _supports_cache_class = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class HySparseModel(HySparsePreTrainedModel):  # type: ignore[no-untyped-call]
    def __init__(self, config: HySparseConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()  # type: ignore[no-untyped-call]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        cos, sin = rope_cos_sin(
            torch.arange(t, device=input_ids.device),
            self.config.dim,
            self.config.rope_theta_value,
        )
        h = self.embed_tokens(input_ids)
        shared: SharedKV | None = None
        for layer in self.layers:
            h, shared = layer(h, cos, sin, shared)
        out: torch.Tensor = self.norm(h)
        return out


class HySparseForCausalLM(HySparsePreTrainedModel, GenerationMixin):  # type: ignore[no-untyped-call]
    """``from_pretrained`` / ``save_pretrained`` / ``generate`` (greedy or sampled, no KV cache).

    Batches must be unpadded (equal-length rows): padding would change what a block holds.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: HySparseConfig) -> None:
        super().__init__(config)
        self.model = HySparseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # type: ignore[no-untyped-call]

    def get_input_embeddings(self) -> nn.Module:
        embed: nn.Module = self.model.embed_tokens
        return embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "HySparseForCausalLM (reference) does not take padded batches: padding shifts "
                "tokens between selection blocks; run prompts of different lengths separately"
            )
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)  # type: ignore[arg-type]

    def prepare_inputs_for_generation(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> dict[str, torch.Tensor | None]:
        # No KV cache: every step recomputes the whole sequence (the reference is for maths).
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _supports_default_dynamic_cache(self) -> bool:  # type: ignore[override]  # no cache
        return False


def perplexity(model: HySparseForCausalLM, input_ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of one sequence ``[1, T]``."""
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    assert out.loss is not None
    return math.exp(float(out.loss))
