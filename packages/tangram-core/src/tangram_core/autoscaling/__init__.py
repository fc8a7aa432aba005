"""Pool autoscaling, in one place: the pure policy (:mod:`.policy`), the loop that applies it to
a running orchestrator (:mod:`.loop`, ``Autoscaler``) and the same policy on the simulator's
virtual clock (:mod:`.simulated`).

The policy's names are exported here; ``Autoscaler`` is imported from :mod:`.loop` (it pulls
in the orchestrator, which the simulator and the pure policy do not need).
"""

from tangram_core.autoscaling.policy import (
    AutoscalingConfig,
    AutoscalingState,
    Policy,
    PoolContext,
    apply_policy,
    queue_delay_policy,
)

__all__ = [
    "AutoscalingConfig",
    "AutoscalingState",
    "Policy",
    "PoolContext",
    "apply_policy",
    "queue_delay_policy",
]
