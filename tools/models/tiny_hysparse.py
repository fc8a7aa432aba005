"""A tiny random HySparse checkpoint (tiny Llama tokenizer), built offline in seconds.

Why: the hysparse-vllm tests compare vLLM's logits with the reference model's, and need a
checkpoint whose prompts of a few hundred tokens span several selection blocks. So: head_dim 32
(vLLM's CPU attention minimum), block_size 32, top-3 blocks, a 48-token sliding window, six
layers with full layers 0 and 3. The q/k projections are initialised 10x larger than the usual
0.02 so that attention is peaked: block scores are then well separated, and a selection does not
hinge on float rounding. Weights are seeded: deterministic, not useful.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_llama import SEED, build_tokenizer

QK_INIT_SCALE = 10.0


def tiny_hysparse_config(tokenizer: object, **overrides: object) -> object:
    from hysparse_vllm.config import HySparseConfig

    tok = tokenizer
    fields: dict[str, object] = {
        "vocab_size": len(tok),  # type: ignore[arg-type]
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "full_attention_layers": [0, 3],
        "block_size": 32,
        "topk_blocks": 3,
        "sink_blocks": 1,
        "swa_window": 48,
        "score_agg": "sum",
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),  # type: ignore[attr-defined]
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),  # type: ignore[attr-defined]
        "pad_token_id": tok.convert_tokens_to_ids("<pad>"),  # type: ignore[attr-defined]
        "dtype": "float32",
    }
    fields.update(overrides)
    return HySparseConfig(**fields)


def build(out: Path) -> None:
    """Write tokenizer + seeded random HySparse weights (safetensors) into ``out``."""
    import torch
    from transformers import GenerationConfig

    from hysparse_vllm.modeling import HySparseForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_hysparse_config(tokenizer)
    torch.manual_seed(SEED + 2)
    model = HySparseForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "swa_k_proj"):
                if hasattr(attn, name):
                    getattr(attn, name).weight.mul_(QK_INIT_SCALE)
            if hasattr(attn, "branch_gate"):
                attn.branch_gate.weight.mul_(10.0)  # gates spread over (0, 1), not all ~0.5
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=config.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=config.pad_token_id,  # type: ignore[attr-defined]
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    (out / "tangram-fixture.json").write_text(
        json.dumps({"kind": "tiny-hysparse", "seed": SEED + 2}, indent=1)
    )
