"""Tangram reward-serve: rule verifiers and reward models as Ray Serve deployments.

Ray Serve and torch are optional extras and are imported only by the modules that need them."""

__version__ = "0.1.0"

__all__ = ["__version__"]
