"""HySparse for vLLM: full-attention layers feed top-k KV blocks and KV cache to sparse layers.

vLLM imports this package in every engine process (plugin entry point), so importing it must not
import vLLM or torch by itself: the public names below load their modules on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "HySparseConfig",
    "HySparseForCausalLM",
    "__version__",
    "parse_pattern",
    "register_transformers",
    "select_blocks",
]

_LAZY = {
    "HySparseConfig": "hysparse_vllm.config",
    "parse_pattern": "hysparse_vllm.config",
    "HySparseForCausalLM": "hysparse_vllm.modeling",
    "select_blocks": "hysparse_vllm.selection",
}

if TYPE_CHECKING:
    from .config import HySparseConfig, parse_pattern
    from .modeling import HySparseForCausalLM
    from .selection import select_blocks


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hysparse_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def register_transformers() -> None:
    """Teach ``AutoConfig`` / ``AutoModelForCausalLM`` model_type ``"hysparse"`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import HySparseConfig
    from .modeling import HySparseForCausalLM

    AutoConfig.register("hysparse", HySparseConfig, exist_ok=True)
    AutoModelForCausalLM.register(HySparseConfig, HySparseForCausalLM, exist_ok=True)
