#!/usr/bin/env python3
"""What a training-free ``hysparse-convert`` costs: perplexity of SmolLM2-135M-Instruct, converted.

The original model (transformers' Llama) and its HySparse conversions are scored on the
package's built-in text (``hysparse_vllm.eval_text``, 765 tokens), in fp32, with the plain
PyTorch reference model. Conversions vary the pattern (``all`` = every layer full, a check that
conversion itself is lossless; ``1:1``, ``1:2``, ``1:5``), the initial gate (``g = 0.5``, SWA
branch only, sparse branch only), and the selection budget: the default knobs (block 64, top-16,
window 128: top-16 covers this whole text, so the sparse branch is dense attention over the
full layer's KV) and a tight one (block 32, top-4, window 64) in which selection drops most of
the context.

Writes ``tools/bench/results/hysparse_convert.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = ROOT / ".cache" / "models" / "smollm2-135m-instruct"

PATTERNS = ["1:1", "1:2", "1:5"]
GATES = {"mix (g=0.5)": 0.0, "swa only": -30.0, "sparse only": 30.0}
BUDGETS = {
    "default (B64, top16, W128)": {"block_size": 64, "topk_blocks": 16, "swa_window": 128},
    "tight (B32, top4, W64)": {"block_size": 32, "topk_blocks": 4, "swa_window": 64},
}


def nll(logits: Any, ids: Any) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--out", type=Path, default=RESULTS / "hysparse_convert.json")
    args = parser.parse_args()

    import json

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hysparse_vllm.convert import (
        ConvertOptions,
        convert_state_dict,
        hysparse_config_from,
        load_state_dict,
    )
    from hysparse_vllm.eval_text import EVAL_TEXT
    from hysparse_vllm.modeling import HySparseForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor([tok(EVAL_TEXT).input_ids])
    source_cfg = json.loads((args.model / "config.json").read_text())
    state = {k: v.float() for k, v in load_state_dict(args.model).items()}

    t0 = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_ppl = math.exp(nll(base(ids).logits, ids))
    del base
    print(f"original Llama: ppl {base_ppl:.2f}")

    def score(pattern: str, gate: float, budget: dict[str, int]) -> float:
        opts = ConvertOptions(
            source=args.model,
            out=Path("/nonexistent"),
            pattern=pattern,
            gate_bias=gate,
            dtype="float32",
            **budget,
        )
        config = hysparse_config_from(source_cfg, opts)
        model = HySparseForCausalLM(config).eval()
        converted = convert_state_dict(state, config, gate)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embeddings
        model.tie_weights()
        with torch.no_grad():
            return math.exp(nll(model(ids).logits, ids))

    rows: list[dict[str, Any]] = []
    default_budget = BUDGETS["default (B64, top16, W128)"]
    all_full = score("all", 0.0, default_budget)
    rows.append({"pattern": "all", "gate": "-", "budget": "-", "ppl": all_full})
    print(f"all full (conversion check): ppl {all_full:.2f}")
    for budget_name, budget in BUDGETS.items():
        for pattern in PATTERNS:
            for gate_name, gate in GATES.items():
                ppl = score(pattern, gate, budget)
                rows.append(
                    {"pattern": pattern, "gate": gate_name, "budget": budget_name, "ppl": ppl}
                )
                print(f"{budget_name:28s} {pattern:4s} {gate_name:12s} ppl {ppl:10.2f}")
    result = {
        "benchmark": "hysparse_convert",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "text_tokens": int(ids.shape[1]),
        "original_ppl": base_ppl,
        "all_full_ppl": all_full,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "note": "training-free conversion; fine-tuning to recover quality is future work",
        "versions": machine_info("torch", "transformers", "hysparse-vllm"),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
