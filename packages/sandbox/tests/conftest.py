"""Shared fixtures: skip the real-pool tests where this host cannot sandbox at all.

Also puts this directory on ``sys.path`` (tests run with ``--import-mode=importlib``), for the
helper modules beside the tests (``host_processes``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tangram_sandbox.isolation import capabilities

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def can_sandbox() -> None:
    """Skip when the host lacks the layers the pool cannot run without (mount namespaces)."""
    caps = capabilities()
    if not (caps.available("mount_ns") and caps.available("private_tmp")):
        pytest.skip(f"no mount namespace here: {caps.layer('mount_ns').detail}")
