"""Model types transformers does not know come from installed packages' entry points, never
from r1-train naming the package (hysparse-vllm stands alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1_train.policy import MODEL_TYPE_ENTRY_POINTS, register_architecture


def test_an_unknown_model_type_names_itself_and_the_entry_point_group(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    with pytest.raises(RuntimeError) as info:
        register_architecture(tmp_path)
    assert "'nosuchmodel' checkpoint" in str(info.value)
    assert MODEL_TYPE_ENTRY_POINTS in str(info.value)


def test_hysparse_registers_through_its_entry_point(tmp_path: Path) -> None:
    pytest.importorskip("hysparse_vllm")
    from transformers import CONFIG_MAPPING

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hysparse"}))
    register_architecture(tmp_path)
    assert "hysparse" in CONFIG_MAPPING


def test_r1_train_names_no_model_package() -> None:
    src = Path(__file__).parent.parent / "src" / "r1_train"
    offenders = [p.name for p in src.glob("*.py") if "import hysparse_vllm" in p.read_text()]
    assert offenders == []
