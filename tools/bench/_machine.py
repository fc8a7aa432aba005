"""What every benchmark result shares: machine and version facts, and how it is written."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
from pathlib import Path
from typing import Any


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


def write_result(result: dict[str, Any], path: Path) -> None:
    """Write a benchmark's JSON result (creating its folder) and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
