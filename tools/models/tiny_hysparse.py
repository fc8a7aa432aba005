"""A tiny random HySparse checkpoint (tiny Llama tokenizer), built offline in seconds.

Why: the hysparse-vllm tests compare vLLM's logits with the reference model's, and need a
checkpoint whose prompts of a few hundred tokens span several selection blocks. So: head_dim 32
(vLLM's CPU attention minimum), block_size 32, top-3 blocks, a 48-token sliding window, six
layers with full layers 0 and 3. The q/k projections are initialised 10x larger than the usual
0.02 so that attention is peaked: block scores are then well separated, and a selection does not
hinge on float rounding. Weights are seeded: deterministic, not useful.
"""

from __future__ import annotations

from pathlib import Path

from tiny_llama import SEED, build_tokenizer, save_causal_lm, tiny_fields

QK_INIT_SCALE = 10.0


def tiny_hysparse_config(tokenizer: object, **overrides: object) -> object:
    """The tiny Llama shape with six layers and the HySparse fields described above."""
    from hysparse_vllm.config import HySparseConfig

    fields: dict[str, object] = {
        **tiny_fields(tokenizer),
        "num_hidden_layers": 6,
        "full_attention_layers": [0, 3],
        "block_size": 32,
        "topk_blocks": 3,
        "sink_blocks": 1,
        "swa_window": 48,
        "score_agg": "sum",
    }
    fields.update(overrides)
    return HySparseConfig(**fields)


def build(out: Path) -> None:
    """Write tokenizer + seeded random HySparse weights (safetensors) into ``out``."""
    import torch

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
    save_causal_lm(model, tokenizer, out, {"kind": "tiny-hysparse", "seed": SEED + 2})
