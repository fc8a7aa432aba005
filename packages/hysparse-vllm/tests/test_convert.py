"""hysparse-convert on the tiny Llama: the mapping is exact where the maths says it must be."""

from __future__ import annotations

import json

import pytest
import torch

from hysparse_vllm.convert import main
from hysparse_vllm.modeling import HySparseForCausalLM


def llama_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def converted_logits(out_dir, ids: torch.Tensor) -> torch.Tensor:
    model = HySparseForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(4, 600, (1, 90), generator=torch.Generator().manual_seed(0))


def test_all_full_pattern_is_the_original_model(tiny_model_dir, tmp_path, ids):
    assert main(["--from", str(tiny_model_dir), "--out", str(tmp_path), "--pattern", "all"]) == 0
    assert torch.allclose(
        converted_logits(tmp_path, ids), llama_logits(tiny_model_dir, ids), atol=1e-4
    )


def test_sparse_layer_with_swa_only_gate_and_wide_window_is_the_original(
    tiny_model_dir, tmp_path, ids
):
    # gate -> 0 selects the SWA branch, whose K/V projections are the layer's own; with a window
    # wider than the text it is the original causal attention.
    args = ["--from", str(tiny_model_dir), "--out", str(tmp_path), "--pattern", "1:1"]
    assert main([*args, "--gate-bias", "-60", "--swa-window", "512", "--block-size", "32"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "hysparse"
    assert cfg["full_attention_layers"] == [0]
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.k_proj.weight" not in names
    assert {
        "model.layers.1.self_attn.swa_k_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    } <= names
    assert torch.allclose(
        converted_logits(tmp_path, ids), llama_logits(tiny_model_dir, ids), atol=1e-4
    )
    # ... and the sparse branch (gate -> 1) is a different model: the test above is not vacuous
    other = tmp_path / "sparse"
    assert main([*args[:3], str(other), *args[4:], "--gate-bias", "60", "--block-size", "32"]) == 0
    assert not torch.allclose(
        converted_logits(other, ids), llama_logits(tiny_model_dir, ids), atol=1e-2
    )


def test_bad_inputs_fail_with_a_message(tiny_model_dir, tmp_path, capsys):
    assert main(["--from", str(tmp_path), "--out", str(tmp_path / "o"), "--pattern", "1:1"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert (
        main(["--from", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--pattern", "1"]) == 2
    )
    assert "layer 0 is sparse" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["--from", str(tmp_path), "--out", str(tmp_path / "o"), "--pattern", "1:1"]) == 2
    assert "not supported" in capsys.readouterr().err


def test_a_reward_model_is_refused_and_nothing_is_written(tiny_rm_dir, tmp_path):
    # tiny-rm is a LlamaForSequenceClassification: llama-typed, but its head is `score`.
    import subprocess
    import sys

    out = tmp_path / "o"
    cmd = ["-m", "hysparse_vllm.convert", "--from", str(tiny_rm_dir), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, *cmd, "--pattern", "1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "LlamaForSequenceClassification" in proc.stderr
    assert "not a causal LM" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_headless_checkpoint_without_architectures_is_refused(tiny_model_dir, tmp_path, capsys):
    # no `architectures` to go by: the tensors tell, an untied model needs lm_head.weight
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.pop("architectures", None)
    assert not cfg.get("tie_word_embeddings")
    (src / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    state.pop("lm_head.weight")
    save_file(state, str(src / "model.safetensors"))
    assert main(["--from", str(src), "--out", str(tmp_path / "o"), "--pattern", "1:1"]) == 2
    assert "no lm_head.weight" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
