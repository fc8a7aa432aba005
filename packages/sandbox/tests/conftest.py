"""Shared fixtures: skip the real-pool tests where this host cannot sandbox at all."""

from __future__ import annotations

import pytest

from tangram_sandbox.isolation import capabilities


@pytest.fixture(scope="session")
def can_sandbox() -> None:
    """Skip when the host lacks the layers the pool cannot run without (mount namespaces)."""
    caps = capabilities()
    if not (caps.available("mount_ns") and caps.available("private_tmp")):
        pytest.skip(f"no mount namespace here: {caps.layer('mount_ns').detail}")
