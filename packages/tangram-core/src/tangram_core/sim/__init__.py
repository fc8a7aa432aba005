"""Cluster-scale discrete-event simulation of action scheduling (see :mod:`.engine`)."""

from tangram_core.sim.engine import SimAction, SimResult, Simulator, TrajectoryPlan, Turn
from tangram_core.sim.workloads import (
    CodeAgentWorkload,
    TraceRecord,
    code_agent_steps,
    count_actions,
    load_trace,
    poisson_actions,
    save_trace,
    summarize,
)

__all__ = [
    "CodeAgentWorkload",
    "SimAction",
    "SimResult",
    "Simulator",
    "TraceRecord",
    "TrajectoryPlan",
    "Turn",
    "code_agent_steps",
    "count_actions",
    "load_trace",
    "poisson_actions",
    "save_trace",
    "summarize",
]
