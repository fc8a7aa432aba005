"""Tangram core: action-level orchestration of external resources for agentic RL.

Importing this package is cheap on purpose: it pulls in neither Ray, torch nor vLLM,
so that pure-logic users (a scheduler simulation, a unit test) pay nothing for them.
Heavy backends are imported only by the modules that need them.
"""

__version__ = "0.1.0"  # the single source: pyproject reads it (hatch)

from tangram_core.telemetry import TelemetryHandle, configure_telemetry, get_meter, get_tracer

__all__ = ["TelemetryHandle", "__version__", "configure_telemetry", "get_meter", "get_tracer"]
