"""HySparse for vLLM: full-attention layers feed top-k KV blocks and KV cache to sparse layers.

vLLM imports this package in every engine process (plugin entry point), so importing it must not
import vLLM or torch by itself."""

__version__ = "0.1.0"

__all__ = ["__version__"]
