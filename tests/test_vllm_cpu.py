"""Real vLLM (the CPU build) serves both model fixtures, and agrees with transformers."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@contextlib.contextmanager
def vllm_engine(path: Path, **kwargs: Any) -> Iterator[Any]:
    """An in-process vLLM engine, shut down after use (its EngineCore is a child process)."""
    from vllm import LLM

    llm = LLM(model=str(path), max_model_len=512, seed=0, enforce_eager=True, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def test_vllm_greedy_matches_transformers_on_smollm2(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    with vllm_engine(smollm2_dir, dtype="float32") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
        vllm_ids = [list(o.outputs[0].token_ids) for o in outs]

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for prompt, ids in zip(PROMPTS, vllm_ids, strict=True):
        enc = tok(prompt, return_tensors="pt").input_ids
        ref = model.generate(enc, max_new_tokens=12, do_sample=False)[0, enc.shape[1] :].tolist()
        assert ids == ref, (prompt, tok.decode(ids), tok.decode(ref))


def test_tiny_model_serves_groups_in_vllm(tiny_model_dir):
    from vllm import SamplingParams

    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    with vllm_engine(tiny_model_dir) as llm:
        (out,) = llm.generate(["2 + 3 ="], params)
    assert len(out.outputs) == 4
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # sampling, not copies
