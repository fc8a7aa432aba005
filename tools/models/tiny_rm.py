"""A tiny scalar reward model (Llama + one-logit head) with the tiny tokenizer, built offline.

Why: reward-serve's scalar reward model loads a real ``AutoModelForSequenceClassification``
checkpoint from a local directory, and its batching benchmark needs one that runs in
milliseconds. Weights are random and seeded: scores are deterministic, not meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_llama import SEED, build_tokenizer, tiny_config


def build(out: Path) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, num_labels=1, problem_type="regression")
    torch.manual_seed(SEED + 1)
    model = LlamaForSequenceClassification(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    (out / "tangram-fixture.json").write_text(json.dumps({"kind": "tiny-rm", "seed": SEED + 1}))
