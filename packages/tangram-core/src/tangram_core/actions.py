"""Actions and their results: the unit of work Tangram schedules.

An action is one atomic external call a rollout makes: run this code, score this response. It
carries what it needs (a demand vector per unit, over named resource types), how elastic it is,
and a payload that only its resource manager reads. These are pydantic models because they
cross the user edge (RL frameworks build them, HTTP and Ray carry them); the scheduler works on
its own compact records inside.
"""

from __future__ import annotations

import enum
import itertools
import os
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tangram_core.elasticity import Elasticity

_ids = itertools.count()
_prefix = f"{os.getpid():x}"


def new_action_id() -> str:
    """A process-unique id, cheap enough for a million actions a minute."""
    return f"a-{_prefix}-{next(_ids)}"


class Action(BaseModel):
    """One external call to schedule. ``demand`` is per unit: with u units it uses u * demand."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_action_id, min_length=1)
    kind: str = Field(min_length=1, description="What to do, e.g. 'sandbox.run', 'reward.rm'.")
    trajectory_id: str | None = Field(None, description="The rollout this action belongs to.")
    step_id: int | None = Field(None, ge=0, description="The RL step that issued it.")
    priority: int = Field(0, description="Higher runs first; ties go to the scheduler's policy.")
    demand: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 1.0},
        description="Per-unit demand over resource types (cpu, gpu, gpu_mem, or your own).",
    )
    elasticity: Elasticity = Field(default_factory=Elasticity)
    size: float = Field(
        1.0, gt=0, description="Work size (tests, tokens) that the duration estimator scales by."
    )
    estimated_duration_s: float | None = Field(
        None,
        gt=0,
        description="The caller's estimate of T(1); the online estimator is used if unset.",
    )
    features: dict[str, float] = Field(
        default_factory=dict,
        description="Numbers that predict the duration (tests, code_bytes, input_tokens, ...); "
        "the payload-aware estimator learns from them. Each must be finite and >= 0.",
    )
    deadline_s: float | None = Field(
        None, gt=0, description="Seconds after submission by which the result is still useful."
    )
    payload: dict[str, Any] = Field(default_factory=dict, description="Read by the manager only.")

    @field_validator("demand")
    @classmethod
    def _demand(cls, demand: dict[str, float]) -> dict[str, float]:
        if not demand:
            raise ValueError("demand must name at least one resource type, e.g. {'cpu': 1}")
        bad = {k: v for k, v in demand.items() if not (v > 0) or not k}
        if bad:
            raise ValueError(f"every demand must be a named resource with amount > 0; got {bad}")
        return demand

    @field_validator("features")
    @classmethod
    def _features(cls, features: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in features.items() if not (0 <= v < float("inf")) or not k}
        if bad:
            raise ValueError(
                f"every feature must be a named, finite number >= 0 (counts, sizes); got {bad}"
            )
        return features


class ActionStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"  # the action ran and failed (its own fault: bad code, bad input)
    INFRA_ERROR = "infra_error"  # the resource failed (worker died) past the retry budget
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    REJECTED = "rejected"  # never admitted: cannot fit any pool, or the queue was full


class ActionResult(BaseModel):
    """What came of an action, with its timings. ACT = end - submit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action_id: str
    kind: str
    status: ActionStatus
    output: Any = None
    error: str | None = Field(None, description="Human-readable cause when status is not ok.")
    error_type: str | None = Field(None, description="The exception class, for error.type.")
    submit_time: float
    start_time: float | None = None
    end_time: float
    units: int = 0
    attempts: int = 1
    trajectory_id: str | None = None

    @property
    def queue_wait_s(self) -> float:
        return (
            self.start_time if self.start_time is not None else self.end_time
        ) - self.submit_time

    @property
    def run_time_s(self) -> float:
        return 0.0 if self.start_time is None else self.end_time - self.start_time

    @property
    def act_s(self) -> float:
        """Action completion time: from submission to result."""
        return self.end_time - self.submit_time

    @property
    def ok(self) -> bool:
        return self.status is ActionStatus.OK

    @property
    def invalid_payload(self) -> bool:
        """The manager refused the payload (:class:`InvalidPayload`): the caller's fault, not
        the resource's, so retrying or counting it as a failed sample would both be wrong."""
        return self.status is ActionStatus.ERROR and self.error_type == InvalidPayload.__name__


class Submitter(Protocol):
    """What builds and awaits actions needs of an orchestrator (or of anything that forwards to
    one, such as a Ray actor handle's wrapper): ``submit`` always returns a result."""

    async def submit(self, action: Action) -> ActionResult: ...


class InvalidPayload(ValueError):
    """A manager cannot run this action's payload (a missing field, a function it may not run,
    arguments that cannot be sent). Raised by managers; the result says ``error_type``
    ``InvalidPayload`` and status ``error``, and :attr:`ActionResult.invalid_payload` reads it."""


class QueueFull(Exception):
    """More actions (or requests) are waiting than the queue's bound allows; nothing was queued."""
