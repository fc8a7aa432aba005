"""Tangram r1-train: R1-style GRPO whose rollouts, tools and rewards run through tangram-core."""

__version__ = "0.1.0"

__all__ = ["__version__"]
