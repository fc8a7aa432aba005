"""Cluster-scale discrete-event simulation: action scheduling (:mod:`.engine`) and whole RL
training loops, synchronous or asynchronous (:mod:`.rl_loop`)."""

from tangram_core.autoscaling.simulated import PoolScaling, SimAutoscaling
from tangram_core.sim.bounds import CapacityBound, capacity_bound, result_jobs, trace_jobs
from tangram_core.sim.engine import (
    ActionRunner,
    SimAction,
    SimResult,
    Simulator,
    TrajectoryPlan,
    Turn,
)
from tangram_core.sim.rl_config import DecodeModel, RLLoopConfig, RolloutWorkload, TrainerModel
from tangram_core.sim.rl_loop import RLLoopResult, TrainedSample, simulate_rl_loop
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
    "ActionRunner",
    "CapacityBound",
    "CodeAgentWorkload",
    "DecodeModel",
    "PoolScaling",
    "RLLoopConfig",
    "RLLoopResult",
    "RolloutWorkload",
    "SimAction",
    "SimAutoscaling",
    "SimResult",
    "Simulator",
    "TraceRecord",
    "TrainedSample",
    "TrainerModel",
    "TrajectoryPlan",
    "Turn",
    "capacity_bound",
    "code_agent_steps",
    "count_actions",
    "load_trace",
    "poisson_actions",
    "result_jobs",
    "save_trace",
    "simulate_rl_loop",
    "summarize",
    "trace_jobs",
]
