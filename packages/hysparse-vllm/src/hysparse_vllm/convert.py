"""``hysparse-convert``: turn a Llama or Qwen2 checkpoint into a HySparse checkpoint, training-free.

    hysparse-convert --from DIR --pattern 1:5 --out DIR [--block-size 64 --topk-blocks 16 ...]

What happens to each layer:

* a **full** layer (``--pattern``) keeps everything: q/k/v/o projections, norms, MLP;
* a **sparse** layer keeps its q/o projections, norms and MLP; its sparse branch has no K/V
  projection (it reads the full layer's cache), so the layer's own ``k_proj``/``v_proj`` become
  the sliding-window branch's ``swa_k_proj``/``swa_v_proj`` (the closest training-free start:
  inside the window the SWA branch is exactly the original attention); the gate starts as a
  constant ``sigmoid(--gate-bias)`` (zero weight).

A converted model loses quality (the sparse branch pairs a layer's queries with another layer's
keys); ``tools/bench/hysparse_convert.py`` measures how much. To recover it, distil from the
dense model (r1-train's README, "HySparse recovery").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUPPORTED = ("llama", "qwen2")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


class ConvertOptions(BaseModel):
    """The converter's inputs (validated; one description per field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Path = Field(description="Llama or Qwen2 checkpoint directory.")
    out: Path = Field(description="Where to write the HySparse checkpoint.")
    pattern: str = Field(description="'1:5' (1 full then 5 sparse, repeated), '0,6,12' or 'all'.")
    block_size: int = Field(64, gt=0, description="Tokens per selection block.")
    topk_blocks: int = Field(16, gt=0, description="Blocks per sparse query, forced included.")
    sink_blocks: int = Field(1, ge=0, description="Leading blocks always selected.")
    swa_window: int = Field(128, gt=0, description="Sliding-window branch size in tokens.")
    score_agg: Literal["sum", "max"] = Field("sum", description="Head aggregation in a group.")
    gate_bias: float = Field(0.0, description="Initial gate logit: g = sigmoid(gate_bias).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="Stored dtype; 'auto' keeps the source's."
    )


def check_causal_lm(source: Path, source_cfg: dict[str, Any], names: set[str]) -> None:
    """Refuse a checkpoint that is not a causal LM, before anything is written.

    Why: a Llama-typed reward model or classifier (``LlamaForSequenceClassification``) has the
    same ``model_type`` and decoder tensors, but its head is ``score``, not ``lm_head``.
    Converted, it would carry no output head, and loading it would silently draw a random one.
    ``names`` are the checkpoint's tensor names."""
    archs = [str(a) for a in source_cfg.get("architectures") or []]
    wrong = [a for a in archs if not a.endswith("ForCausalLM")]
    if wrong:
        raise ValueError(
            f"{source}: architectures {wrong} is not a causal LM; hysparse-convert needs a "
            "*ForCausalLM checkpoint (a reward model or classifier has no language-model head "
            "to keep)"
        )
    tied = bool(source_cfg.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in names:
        heads = sorted(n for n in names if not n.startswith("model."))
        raise ValueError(
            f"{source}: no lm_head.weight and tie_word_embeddings is false, so the converted "
            f"model would have no output head (tensors outside model.*: {heads[:5]}); pass a "
            "causal-LM checkpoint"
        )


def hysparse_config_from(source_cfg: dict[str, Any], opts: ConvertOptions) -> Any:
    """A :class:`HySparseConfig` with the source's decoder shape and the chosen HySparse knobs."""
    from .config import HySparseConfig, parse_pattern

    kind = source_cfg.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"{opts.source}: model_type {kind!r} is not supported; hysparse-convert reads "
            f"{list(SUPPORTED)} checkpoints"
        )
    if source_cfg.get("use_sliding_window"):
        raise ValueError(f"{opts.source}: sliding-window Qwen2 checkpoints are not supported")
    n = int(source_cfg["num_hidden_layers"])
    heads = int(source_cfg["num_attention_heads"])
    fields = {
        "vocab_size": source_cfg["vocab_size"],
        "hidden_size": source_cfg["hidden_size"],
        "intermediate_size": source_cfg["intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": source_cfg.get("num_key_value_heads") or heads,
        "head_dim": source_cfg.get("head_dim") or source_cfg["hidden_size"] // heads,
        "hidden_act": source_cfg.get("hidden_act", "silu"),
        "max_position_embeddings": source_cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": source_cfg.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": source_cfg.get("tie_word_embeddings", False),
        "mlp_bias": source_cfg.get("mlp_bias", False),
        "bos_token_id": source_cfg.get("bos_token_id"),
        "eos_token_id": source_cfg.get("eos_token_id"),
        "pad_token_id": source_cfg.get("pad_token_id"),
        "full_attention_layers": parse_pattern(opts.pattern, n),
        "block_size": opts.block_size,
        "topk_blocks": opts.topk_blocks,
        "sink_blocks": opts.sink_blocks,
        "swa_window": opts.swa_window,
        "score_agg": opts.score_agg,
    }
    rope = source_cfg.get("rope_parameters") or source_cfg.get("rope_scaling")
    theta = source_cfg.get("rope_theta")
    if isinstance(rope, dict):
        fields["rope_parameters"] = {"rope_type": "default", **rope}
    elif theta is not None:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if kind == "qwen2":  # q/k/v carry biases, o_proj does not
        fields["attention_bias"] = False
        fields["qkv_bias"] = True
    else:
        fields["attention_bias"] = source_cfg.get("attention_bias", False)
    fields["dtype"] = stored_dtype(source_cfg, opts)
    return HySparseConfig(**fields)


def stored_dtype(source_cfg: dict[str, Any], opts: ConvertOptions) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    name = str(source_cfg.get("dtype") or source_cfg.get("torch_dtype") or "float32")
    return name.removeprefix("torch.")


def convert_state_dict(state: dict[str, Any], config: Any, gate_bias: float) -> dict[str, Any]:
    """Rename/drop tensors of a Llama-layout state dict into the HySparse layout."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
            layer = int(parts[2])
            proj = parts[4]
            if not config.is_full_layer(layer) and proj in ("k_proj", "v_proj"):
                parts[4] = "swa_" + proj
                name = ".".join(parts)
        out[name] = tensor
    hq = config.num_attention_heads
    hidden = config.hidden_size
    dtype = next(iter(state.values())).dtype
    for i in range(config.num_hidden_layers):
        if not config.is_full_layer(i):
            out[f"model.layers.{i}.self_attn.branch_gate.weight"] = torch.zeros(
                hq, hidden, dtype=dtype
            )
            out[f"model.layers.{i}.self_attn.branch_gate.bias"] = torch.full(
                (hq,), gate_bias, dtype=dtype
            )
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _safetensors_files(source: Path) -> list[Path]:
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{source}: no *.safetensors files (convert .bin checkpoints first)"
        )
    return files


def tensor_names(source: Path) -> set[str]:
    """The checkpoint's tensor names, read from the file headers only (no weights loaded)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in _safetensors_files(source):
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def load_state_dict(source: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = _safetensors_files(source)
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def convert(opts: ConvertOptions) -> Path:
    """Write the HySparse checkpoint; returns ``opts.out``."""
    import torch
    from safetensors.torch import save_file

    cfg_path = opts.source / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{opts.source}: no config.json; pass a Hugging Face checkpoint dir"
        )
    source_cfg = json.loads(cfg_path.read_text())
    config = hysparse_config_from(source_cfg, opts)
    check_causal_lm(opts.source, source_cfg, tensor_names(opts.source))
    state = load_state_dict(opts.source)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    target = dtypes[stored_dtype(source_cfg, opts)]
    state = {k: v.to(target) for k, v in convert_state_dict(state, config, opts.gate_bias).items()}
    opts.out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["HySparseForCausalLM"]
    config.save_pretrained(opts.out)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(opts.out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in TOKENIZER_FILES:
        if (opts.source / name).exists():
            shutil.copy2(opts.source / name, opts.out / name)
    return opts.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hysparse-convert", description="Convert a Llama/Qwen2 checkpoint to HySparse."
    )
    parser.add_argument("--from", dest="source", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pattern", required=True, help="'1:5', '0,6,12' or 'all'")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk-blocks", type=int, default=16)
    parser.add_argument("--sink-blocks", type=int, default=1)
    parser.add_argument("--swa-window", type=int, default=128)
    parser.add_argument("--score-agg", default="sum")
    parser.add_argument("--gate-bias", type=float, default=0.0)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    try:
        opts = ConvertOptions(**vars(args))
        out = convert(opts)
    except (ValidationError, ValueError, FileNotFoundError) as err:
        print(f"hysparse-convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
