"""hysparse-vllm fixtures: the tiny HySparse checkpoint and vLLM's CPU environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# vLLM on this CPU machine (see shared/NOTES-vllm-cpu.md); set before any test imports vLLM.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.fixture(scope="session")
def tiny_hysparse_dir() -> Path:
    """Six layers (full 0 and 3), head_dim 32, block 32, top-3, window 48; seeded random."""
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure("tiny-hysparse"))
