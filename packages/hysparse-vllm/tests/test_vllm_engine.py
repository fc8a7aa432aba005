"""vLLM (CPU, fp32) against the reference model: logits, batching, chunked prefill, prefix
caching, and where the KV cache goes. One engine for the module (start-up costs ~10 s).

The engine is loaded through the plugin entry point (nothing here registers the model), so
these tests also show that ``vllm.LLM(DIR)`` runs a HySparse checkpoint once the package is
installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

MAX_LEN = 1024
BATCH_TOKENS = 128  # < the long prompts: forces chunked prefill and mixed prefill/decode steps
DECODE_STEPS = 3
TOL = 1e-4


def _engine(model_dir: Path, **overrides: Any) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": MAX_LEN,
        "block_size": 32,
        "max_num_batched_tokens": BATCH_TOKENS,
        "max_num_seqs": 8,
        "enable_prefix_caching": True,
        "logprobs_mode": "raw_logits",
        "max_logprobs": -1,
        "seed": 0,
        "distributed_executor_backend": "uni",  # the worker inside EngineCore: one process less
        "worker_extension_cls": "hysparse_vllm.vllm_inspect.KVCacheInspector",
    }
    kwargs.update(overrides)
    return LLM(str(model_dir), **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_hysparse_dir: Path) -> Iterator[Any]:
    engine = _engine(tiny_hysparse_dir)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_hysparse_dir: Path) -> Any:
    from hysparse_vllm.modeling import HySparseForCausalLM

    return HySparseForCausalLM.from_pretrained(tiny_hysparse_dir).eval()


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 600, (n,), generator=g).tolist() for n in lengths]


def run(llm: Any, token_prompts: list[list[int]], prompt_logits: bool = True) -> list[Any]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        max_tokens=DECODE_STEPS,
        temperature=0.0,
        logprobs=-1,
        prompt_logprobs=-1 if prompt_logits else None,
    )
    return llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in token_prompts], params, use_tqdm=False
    )


def vllm_logits(out: Any, vocab: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits predicting prompt tokens 1.., logits of each decode step), raw, fp32."""
    prompt = None
    if out.prompt_logprobs is not None:
        rows = out.prompt_logprobs[1:]
        prompt = torch.tensor([[row[v].logprob for v in range(vocab)] for row in rows])
    steps = out.outputs[0].logprobs
    decode = torch.tensor([[row[v].logprob for v in range(vocab)] for row in steps])
    return prompt, decode


def reference_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def check_against(model: Any, token_prompts: list[list[int]], outs: list[Any]) -> float:
    """Largest |vLLM - reference| over prefill and decode logits of every request."""
    vocab = model.config.vocab_size
    worst = 0.0
    for p, out in zip(token_prompts, outs, strict=True):
        generated = list(out.outputs[0].token_ids)
        assert len(generated) == DECODE_STEPS
        ref = reference_logits(model, p + generated)
        prompt, decode = vllm_logits(out, vocab)
        if prompt is not None:
            worst = max(worst, (prompt - ref[: len(p) - 1]).abs().max().item())
        steps = ref[len(p) - 1 : len(p) - 1 + DECODE_STEPS]
        worst = max(worst, (decode - steps).abs().max().item())
        # greedy decode picks the reference argmax
        assert generated == ref[len(p) - 1 : -1].argmax(-1).tolist()
    return worst


@pytest.mark.parametrize(
    ("lengths", "seed"),
    [([260], 1), ([300, 45, 130], 2), ([5, 33, 64, 97, 200, 31], 3)],
    ids=["batch1", "batch3-mixed", "batch6-mixed"],
)
def test_logits_match_reference_prefill_and_decode(llm, reference, lengths, seed):
    token_prompts = prompts(lengths, seed)
    outs = run(llm, token_prompts)
    assert check_against(reference, token_prompts, outs) < TOL


def test_comparison_has_teeth(llm, reference, tiny_hysparse_dir, tmp_path):
    """A model that differs only in top-k (denser sparse branch) is far outside the tolerance."""
    from hysparse_vllm.modeling import HySparseForCausalLM

    dense_ish = HySparseForCausalLM.from_pretrained(tiny_hysparse_dir, topk_blocks=16).eval()
    token_prompts = prompts([300], 4)
    outs = run(llm, token_prompts)
    vocab = reference.config.vocab_size
    prompt, _ = vllm_logits(outs[0], vocab)
    ours = reference_logits(reference, token_prompts[0])[:299]
    other = reference_logits(dense_ish, token_prompts[0])[:299]
    assert prompt is not None
    assert (prompt - ours).abs().max().item() < TOL
    assert (prompt - other).abs().max().item() > 100 * TOL


def test_prefix_cache_hit_gives_the_same_logits(llm, reference):
    token_prompts = prompts([200], 5)
    run(llm, token_prompts, prompt_logits=False)
    again = run(llm, token_prompts, prompt_logits=False)
    assert again[0].num_cached_tokens >= 160  # whole 32-token pages of the prompt were reused
    assert check_against(reference, token_prompts, again) < TOL


def test_kv_cache_only_for_full_layers_and_sliding_windows(llm, tiny_hysparse_dir, tmp_path):
    info = llm.collective_rpc("hysparse_kv_layout")[0]
    full = [f"model.layers.{i}.self_attn.attn" for i in (0, 3)]
    swa = [f"model.layers.{i}.self_attn.swa_attn" for i in (1, 2, 4, 5)]
    assert info["owners"] == sorted(full + swa)  # no sparse_attn layer owns any cache
    shared = {n for g in info["groups"] for n in g["layers"] if "sparse_attn" in n}
    assert shared == {f"model.layers.{i}.self_attn.sparse_attn" for i in (1, 2, 4, 5)}

    # The same shape with every layer full, in the same KV memory.
    dense_dir = tmp_path / "dense"
    shutil.copytree(tiny_hysparse_dir, dense_dir)
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["full_attention_layers"] = list(range(cfg["num_hidden_layers"]))
    (dense_dir / "config.json").write_text(json.dumps(cfg))
    dense = _engine(dense_dir, load_format="dummy")
    try:
        dense_info = dense.collective_rpc("hysparse_kv_layout")[0]
    finally:
        dense.llm_engine.engine_core.shutdown()
    # one block pool each (the groups overlay it; a block holds one page per layer of a
    # group), of the same size: the same KV memory
    pool, dense_pool = (
        i["num_blocks"] * i["groups"][0]["page_bytes"] * len(i["owners"]) // len(i["groups"])
        for i in (info, dense_info)
    )
    assert abs(pool - dense_pool) / dense_pool < 0.02, (pool, dense_pool)
    ratio = info["capacity_tokens"] / dense_info["capacity_tokens"]
    # Per request: 6 full layers x 1024 tokens (dense) vs 2 x 1024 + 4 sliding windows that
    # must hold window - 1 + one prefill chunk (vLLM's bound): 48 - 1 + 128 -> 6 pages of 32.
    structural = 6 * MAX_LEN / (2 * MAX_LEN + 4 * 6 * 32)
    assert ratio >= 0.9 * structural, (ratio, structural)
    assert ratio > 2.0
