"""The reference model: its maths, its transformers face, and its config errors."""

from __future__ import annotations

import pytest
import torch

from hysparse_vllm.config import HySparseConfig, parse_pattern
from hysparse_vllm.modeling import (
    HySparseForCausalLM,
    SharedKV,
    causal_mask,
    full_layer_selection,
    masked_attention,
    sparse_mask,
)


def make_config(**overrides: object) -> HySparseConfig:
    fields: dict[str, object] = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "full_attention_layers": [0, 2],
        "block_size": 8,
        "topk_blocks": 3,
        "sink_blocks": 1,
        "swa_window": 6,
        "max_position_embeddings": 256,
    }
    fields.update(overrides)
    return HySparseConfig(**fields)  # type: ignore[arg-type]


def make_model(seed: int = 0, **overrides: object) -> HySparseForCausalLM:
    torch.manual_seed(seed)
    model = HySparseForCausalLM(make_config(**overrides)).eval()
    with torch.no_grad():  # sharper attention than the 0.02 init, so block scores differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
    return model


def qkv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, t, 32, generator=g),
        torch.randn(1, 2, t, 32, generator=g),
        torch.randn(1, 2, t, 32, generator=g),
    )


def test_full_topk_sparse_branch_equals_dense_attention_over_shared_kv():
    t, b = 50, 8  # 7 blocks; topk 7 covers every candidate of every query
    q, k, v = qkv(t)
    dense, probs = masked_attention(q, k, v, causal_mask(t), 32**-0.5)
    sel = full_layer_selection(probs, 2, block_size=b, topk=7, sink_blocks=1, agg="sum")
    mask = sparse_mask(sel, t, b).repeat_interleave(2, dim=1)
    sparse, _ = masked_attention(q, k, v, mask, 32**-0.5)
    assert torch.allclose(sparse, dense, atol=1e-6)
    # with a smaller top-k the late queries do differ: the test above is not vacuous
    sel3 = full_layer_selection(probs, 2, block_size=b, topk=3, sink_blocks=1, agg="sum")
    mask3 = sparse_mask(sel3, t, b).repeat_interleave(2, dim=1)
    assert not torch.allclose(masked_attention(q, k, v, mask3, 32**-0.5)[0], dense, atol=1e-3)


def test_sparse_branch_reads_only_selected_blocks():
    t, b = 40, 8
    q, k, v = qkv(t, seed=1)
    _, probs = masked_attention(q, k, v, causal_mask(t), 32**-0.5)
    sel = full_layer_selection(probs, 2, block_size=b, topk=2, sink_blocks=1, agg="max")
    mask = sparse_mask(sel, t, b)
    # the last query (block 4) sees its sink block 0 and its own block, nothing else
    assert sel[0, :, -1].tolist() == [[0, 4], [0, 4]]
    assert mask[0, 0, -1].nonzero().flatten().tolist() == [*range(8), *range(32, 40)]
    # changing K/V outside the selected blocks leaves the sparse output unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:32] += 5.0
    v2[:, :, 8:32] -= 5.0
    m = mask.repeat_interleave(2, dim=1)
    out1 = masked_attention(q, k, v, m, 1.0)[0][:, :, -1]
    out2 = masked_attention(q, k2, v2, m, 1.0)[0][:, :, -1]
    assert torch.allclose(out1, out2)


def test_sparse_layers_use_preceding_full_layer_selection():
    model = make_model()
    ids = torch.randint(0, 97, (1, 40))
    seen: list[SharedKV] = []
    layers = model.model.layers
    for i in (1, 3):
        orig = layers[i].self_attn.forward

        def spy(x, cos, sin, shared, orig=orig):  # type: ignore[no-untyped-def]
            seen.append(shared)
            return orig(x, cos, sin, shared)

        layers[i].self_attn.forward = spy  # type: ignore[method-assign]
    model(ids)
    assert seen[0] is not seen[1]  # layer 3 reads layer 2's, not layer 0's
    assert seen[0].selection.shape == (1, 2, 40, 3)


def test_gate_fuses_branches_per_head():
    model = make_model()
    attn = model.model.layers[1].self_attn
    x = torch.randn(1, 20, 64)
    from hysparse_vllm.modeling import rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(20), 32, 10000.0)
    full = model.model.layers[0].self_attn
    _, shared = full(x, cos, sin)
    with torch.no_grad():
        attn.branch_gate.weight.zero_()
        attn.branch_gate.bias.fill_(50.0)  # gate ~1: sparse branch only
        only_sparse = attn(x, cos, sin, shared)
        sparse, swa, _ = attn.branches(x, cos, sin, shared)
        expect = attn.o_proj(attn._merge(sparse))
        assert torch.allclose(only_sparse, expect, atol=1e-5)
        attn.branch_gate.bias.fill_(-50.0)
        assert torch.allclose(attn(x, cos, sin, shared), attn.o_proj(attn._merge(swa)), atol=1e-5)


def test_save_load_round_trip_and_generate(tmp_path):
    model = make_model()
    ids = torch.randint(0, 97, (2, 30))
    model.save_pretrained(tmp_path)
    loaded = HySparseForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.full_attention_layers == [0, 2]
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    out = loaded.generate(
        ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False
    )
    assert out.shape == (1, 34)
    # greedy generate == argmax of the full-sequence forward, step by step
    seq = ids[:1]
    for _ in range(4):
        nxt = loaded(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_auto_classes_after_registration(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import hysparse_vllm

    make_model().save_pretrained(tmp_path)
    hysparse_vllm.register_transformers()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HySparseConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), HySparseForCausalLM)


def test_padded_batches_refused():
    model = make_model()
    with pytest.raises(ValueError, match="padded"):
        model(
            torch.zeros(2, 5, dtype=torch.long),
            attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]),
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"full_attention_layers": [1, 3]}, "layer 0 is sparse but no full layer precedes it"),
        ({"full_attention_layers": []}, "at least one full layer"),
        ({"full_attention_layers": [0, 7]}, r"must lie in \[0, 3\]"),
        ({"topk_blocks": 40}, "exceeds the context"),
        ({"topk_blocks": 1}, "sink_blocks \\+ 1"),
        ({"score_agg": "mean"}, "score_agg"),
        ({"block_size": 0}, "block_size"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_parse_pattern():
    assert parse_pattern("1:4", 12) == [0, 5, 10]
    assert parse_pattern("0,6", 12) == [0, 6]
    assert parse_pattern("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="FULL:SPARSE"):
        parse_pattern("x:y", 4)
