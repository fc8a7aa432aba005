"""``HySparseForCausalLM`` for vLLM's v1 engine (registered by the ``vllm.general_plugins`` hook).

Layers, as the reference model (``modeling.py``) defines them:

* full layer ``model.layers.i.self_attn.attn``: an ``Attention`` that owns its KV cache, with
  the HySparse backend; after it, ``torch.ops.hysparse.select_blocks`` turns its attention into
  the block selection;
* sparse layer: ``self_attn.sparse_attn`` is an ``Attention`` with
  ``kv_sharing_target_layer_name`` = its source full layer (so vLLM allocates it no cache) run
  through ``torch.ops.hysparse.sparse_attention``; ``self_attn.swa_attn`` is an ordinary
  sliding-window ``Attention`` with its own small cache (vLLM's hybrid KV cache manager frees
  pages that leave the window); a per-head sigmoid gate fuses the two.

The selection tensor is returned by each full layer and passed down the decoder loop.
Tensor parallelism and pipeline parallelism are refused at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

from . import vllm_ops  # noqa: F401  (registers torch.ops.hysparse.*)
from .config import HySparseConfig
from .cpu_gather import SelectionParams
from .vllm_backend import HySparseAttentionBackend
from .vllm_checks import check_engine_config


def _params(config: HySparseConfig) -> SelectionParams:
    return SelectionParams(
        block_size=config.block_size,
        topk=config.topk_blocks,
        sink_blocks=config.sink_blocks,
        score_agg=config.score_agg,
    )


class HySparseFullAttention(nn.Module):
    def __init__(self, config: HySparseConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.topk = config.topk_blocks
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.num_heads,
            self.num_kv_heads,
            bias=config.qkv_has_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.q_size, config.hidden_size, bias=config.attention_bias, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = _rope(config)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
            attn_backend=HySparseAttentionBackend,
            hysparse=_params(config),
        )
        self.layer_name = f"{prefix}.attn"

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn = self.attn(q, k, v)
        selection = torch.ops.hysparse.select_blocks(
            q, attn, self.layer_name, self.num_kv_heads, self.topk
        )
        out, _ = self.o_proj(attn)
        return out, selection


class HySparseSparseAttention(nn.Module):
    def __init__(
        self, config: HySparseConfig, vllm_config: VllmConfig, prefix: str, source_layer: int
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        scale = self.head_dim**-0.5
        # q for both branches, k/v for the sliding-window branch only (checkpoint names
        # q_proj, swa_k_proj, swa_v_proj).
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.num_heads,
            self.num_kv_heads,
            bias=config.qkv_has_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.branch_gate = ReplicatedLinear(
            config.hidden_size, self.num_heads, bias=True, prefix=f"{prefix}.branch_gate"
        )
        self.o_proj = RowParallelLinear(
            self.q_size, config.hidden_size, bias=config.attention_bias, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = _rope(config)
        target = f"{prefix.rsplit('.layers.', 1)[0]}.layers.{source_layer}.self_attn.attn"
        self.sparse_attn = Attention(
            self.num_heads,
            self.head_dim,
            scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.sparse_attn",
            kv_sharing_target_layer_name=target,
            attn_backend=HySparseAttentionBackend,
            hysparse=_params(config),
        )
        self.swa_attn = Attention(
            self.num_heads,
            self.head_dim,
            scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            per_layer_sliding_window=config.swa_window,
            prefix=f"{prefix}.swa_attn",
        )
        self.sparse_name = f"{prefix}.sparse_attn"

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, selection: torch.Tensor
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        sparse = torch.empty_like(q)
        torch.ops.hysparse.sparse_attention(q, selection, sparse, self.sparse_name)
        swa = self.swa_attn(q, k, v)
        gate_logits, _ = self.branch_gate(x)
        gate = torch.sigmoid(gate_logits.float()).unsqueeze(-1)  # [T, Hq, 1]
        t = q.shape[0]
        sparse_h = sparse.view(t, self.num_heads, self.head_dim).float()
        swa_h = swa.view(t, self.num_heads, self.head_dim).float()
        fused = (gate * sparse_h + (1 - gate) * swa_h).to(q.dtype).view(t, self.q_size)
        out: torch.Tensor = self.o_proj(fused)[0]
        return out


def _rope(config: HySparseConfig) -> nn.Module:
    return get_rope(
        config.dim,
        max_position=config.max_position_embeddings,
        is_neox_style=True,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta_value},
    )


class HySparseDecoderLayer(nn.Module):
    def __init__(self, config: HySparseConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        idx = extract_layer_index(prefix)
        self.is_full = config.is_full_layer(idx)
        self.self_attn: HySparseFullAttention | HySparseSparseAttention
        if self.is_full:
            self.self_attn = HySparseFullAttention(config, vllm_config, f"{prefix}.self_attn")
        else:
            self.self_attn = HySparseSparseAttention(
                config, vllm_config, f"{prefix}.self_attn", config.source_full_layer(idx)
            )
        self.mlp = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=config.mlp_bias,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        selection: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if isinstance(self.self_attn, HySparseFullAttention):
            hidden, selection = self.self_attn(positions, hidden)
        else:
            assert selection is not None  # the config guarantees a full layer came first
            hidden = self.self_attn(positions, hidden, selection)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual, selection


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": 0,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class HySparseModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: HySparseConfig = vllm_config.model_config.hf_config  # type: ignore[assignment]
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HySparseDecoderLayer(config, vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.embed_tokens(input_ids)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        selection: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual, selection = layer(positions, hidden, residual, selection)
        normed: torch.Tensor = self.norm(hidden, residual)[0]
        return normed


# checkpoint name -> (vLLM parameter, shard)
_STACKED = [
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".swa_k_proj", ".qkv_proj", "k"),
    (".swa_v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
]


class HySparseForCausalLM(nn.Module):
    """vLLM's HySparse causal LM. Weights load from the reference model's checkpoints."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: HySparseConfig = vllm_config.model_config.hf_config  # type: ignore[assignment]
        if not isinstance(config, HySparseConfig):
            raise TypeError(f"expected a HySparseConfig, got {type(config).__name__}")
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            raise ValueError("HySparse supports neither tensor nor pipeline parallelism")
        check_engine_config(vllm_config)
        self.config = config
        self.model = HySparseModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits: torch.Tensor | None = self.logits_processor(self.lm_head, hidden_states)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for ckpt, param_name, shard in _STACKED:
                if ckpt not in name:
                    continue
                target = name.replace(ckpt, param_name)
                param = params[target]
                param.weight_loader(param, weight, shard)  # type: ignore[attr-defined]
                loaded.add(target)
                break
            else:
                if name not in params:
                    raise KeyError(
                        f"checkpoint tensor {name!r} has no place in HySparseForCausalLM; "
                        "is this a HySparse checkpoint (hysparse-convert)?"
                    )
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, weight)
                loaded.add(name)
        return loaded
