"""Tangram sandbox: isolated, pre-warmed code-execution pools driven per action by tangram-core.

Exports load lazily (PEP 562): the zygote imports modules of this package under the system
interpreter, which has none of the project's dependencies, so this file imports nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SandboxPool": "tangram_sandbox.pool",
    "QueueFull": "tangram_sandbox.pool",
    "SandboxUnavailable": "tangram_sandbox.pool",
    "PoolConfig": "tangram_sandbox.config",
    "Limits": "tangram_sandbox.models",
    "RunRequest": "tangram_sandbox.models",
    "RunResult": "tangram_sandbox.models",
    "RunStatus": "tangram_sandbox.models",
    "RunTestsRequest": "tangram_sandbox.models",
    "RunTestsResult": "tangram_sandbox.models",
    "StdinTest": "tangram_sandbox.models",
    "CallTest": "tangram_sandbox.models",
    "Capabilities": "tangram_sandbox.isolation",
    "capabilities": "tangram_sandbox.isolation",
    "SandboxManager": "tangram_sandbox.manager",
    "LANGUAGES": "tangram_sandbox.languages",
    "LanguageUnavailable": "tangram_sandbox.languages",
}

__all__ = [
    "LANGUAGES",
    "CallTest",
    "Capabilities",
    "LanguageUnavailable",
    "Limits",
    "PoolConfig",
    "QueueFull",
    "RunRequest",
    "RunResult",
    "RunStatus",
    "RunTestsRequest",
    "RunTestsResult",
    "SandboxManager",
    "SandboxPool",
    "SandboxUnavailable",
    "StdinTest",
    "__version__",
    "capabilities",
]

if TYPE_CHECKING:
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.isolation import Capabilities, capabilities
    from tangram_sandbox.languages import LANGUAGES, LanguageUnavailable
    from tangram_sandbox.manager import SandboxManager
    from tangram_sandbox.models import (
        CallTest,
        Limits,
        RunRequest,
        RunResult,
        RunStatus,
        RunTestsRequest,
        RunTestsResult,
        StdinTest,
    )
    from tangram_sandbox.pool import QueueFull, SandboxPool, SandboxUnavailable


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tangram_sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
