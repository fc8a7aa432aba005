"""The vLLM plugin's registration and its start-up refusals (no engine is started)."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil

import pytest


def test_entry_point_is_installed():
    eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "hysparse"]
    assert [e.value for e in eps] == ["hysparse_vllm.plugin:register"]
    scripts = [e for e in md.entry_points(group="console_scripts") if e.name == "hysparse-convert"]
    assert [e.value for e in scripts] == ["hysparse_vllm.convert:main"]


@pytest.mark.slow
def test_register_makes_vllm_and_transformers_know_hysparse():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from hysparse_vllm.config import HySparseConfig
    from hysparse_vllm.plugin import register

    register()
    register()  # idempotent: vLLM calls it in every process, maybe more than once
    assert "HySparseForCausalLM" in ModelRegistry.get_supported_archs()
    assert "HySparseForCausalLM" in MODELS_CONFIG_MAP
    assert AutoConfig.for_model("hysparse").__class__ is HySparseConfig


@pytest.mark.slow
def test_backend_reasons():
    import torch

    from hysparse_vllm.vllm_backend import HySparseAttentionBackend as B

    assert B.unsupported_reasons(head_dim=64, dtype=torch.float32, kv_cache_dtype="auto") == []
    (reason,) = B.unsupported_reasons(head_dim=48, dtype=torch.float32, kv_cache_dtype="auto")
    assert "head_dim 48 is not supported" in reason
    (reason,) = B.unsupported_reasons(head_dim=64, dtype=torch.float32, kv_cache_dtype="fp8")
    assert "kv_cache_dtype='auto'" in reason
    (reason,) = B.unsupported_reasons(
        head_dim=64, dtype=torch.float32, kv_cache_dtype="auto", isa="amx"
    )
    assert "ISA 'amx'" in reason


@pytest.mark.slow
def test_a_layer_on_an_unreadable_kv_layout_is_refused_at_its_first_forward():
    from types import SimpleNamespace

    from hysparse_vllm.vllm_backend import UnsupportedKVLayout, check_isa

    check_isa(SimpleNamespace(isa="vec"))  # vLLM's portable layout: read
    check_isa(SimpleNamespace())  # no ISA recorded: vLLM's default, vec
    with pytest.raises(UnsupportedKVLayout, match="ISA 'amx' stores KV in a layout"):
        check_isa(SimpleNamespace(isa="amx"))


def _variant(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changes", "engine_args", "match"),
    [
        ({"head_dim": 48}, {}, "head_dim 48 is not supported"),
        ({}, {"max_model_len": 64}, r"topk_blocks \* block_size \(96\) exceeds max_model_len"),
        ({}, {"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ],
    ids=["head_dim", "topk-over-context", "fp8-kv"],
)
def test_engine_refuses_clearly_at_start(tiny_hysparse_dir, tmp_path, changes, engine_args, match):
    from vllm import LLM

    model = _variant(tiny_hysparse_dir, tmp_path / "m", **changes)
    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, **engine_args}
    with pytest.raises(ValueError, match=match):
        LLM(str(model), **kwargs)
