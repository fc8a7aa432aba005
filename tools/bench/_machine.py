"""Machine and version facts that every benchmark result records (shared by tools/bench/*)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def machine_info(*distributions: str) -> dict[str, str]:
    """Python, platform, cores, and the installed version of each named distribution."""
    info = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "platform": platform.platform(),
    }
    for dist in distributions:
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = "not installed"
    return info
