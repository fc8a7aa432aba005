"""Rewards through tangram-core: every score is an action on a shared pool.

Per trajectory:

* the rule rewards (``math``, ``format``, ``countdown``) go out as one ``reward.rules`` action
  to reward-serve's rule verifier deployment, which returns each rule's score;
* ``code`` runs the task's tests as a ``sandbox.run_tests`` action (reward-serve's code reward);
* ``rm`` asks the scalar reward-model deployment (``reward.rm``).

The reward is the weighted sum of the components in ``rewards.weights``. A component whose
action fails for infrastructure reasons (a replica or worker lost past its retries, a timeout,
a refusal) leaves the reward unset and marks the trajectory with ``infra_error``: reported and
left out of training, never scored 0. A reward function that itself raises (the action's own
``error`` status: a verifier's ``ValueError`` on a bad reference, say) is a bug in the reward or
in the data, not infrastructure: :class:`RewardError` names the task and stops the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from r1_train.agent_loop import Trajectory, step_priority
from r1_train.config import RewardsConfig
from tangram_core import semconv as sc
from tangram_core.actions import Action, ActionResult, ActionStatus, Submitter

_tracer = trace.get_tracer("r1_train")
RULES = ("math", "format", "countdown")
KIND_RULES = "reward.rules"
KIND_RM = "reward.rm"


class RewardFailed(RuntimeError):
    """A reward action did not produce a score (infrastructure), so the sample is not scored."""


class RewardError(RuntimeError):
    """The reward function raised on a task: a bug in the reward or the data, so the run stops.

    Dropping the group as an infrastructure error would hide it: every group of a task with a
    bad reference is dropped, the run trains on nothing and still ends with status 0."""

    def __init__(self, what: str, traj: Trajectory, step: int, result: ActionResult) -> None:
        super().__init__(
            f"reward {what} raised {result.error_type or 'an error'} on task {traj.task.id!r} "
            f"(step {step}, trajectory {traj.id}): {result.error}. A reward that raises is a bug "
            "in the reward function or in the task's data (e.g. its 'answer'), not "
            "infrastructure: fix the task or the reward and run again"
        )
        self.task_id, self.step, self.error_type = traj.task.id, step, result.error_type


def _checked(result: ActionResult, what: str, traj: Trajectory, step: int) -> Any:
    if result.status is ActionStatus.ERROR:
        raise RewardError(what, traj, step, result)
    if not result.ok:
        raise RewardFailed(f"{what} {result.status.value}: {result.error}")
    return result.output


async def _rules(
    orch: Submitter, traj: Trajectory, rules: Sequence[str], step: int
) -> dict[str, float]:
    request: dict[str, Any] = {"response": traj.response or " ", "rules": list(rules)}
    if "math" in rules:
        request["reference"] = traj.task.answer or ""
    if "countdown" in rules:
        request.update(numbers=list(traj.task.numbers), target=traj.task.target)
    action = Action(
        kind=KIND_RULES,
        trajectory_id=traj.id,
        step_id=step,
        priority=step_priority(step),
        demand={"reward": 1.0},
        payload={"request": request},
    )
    result = await orch.submit(action)
    traj.action_act_s[KIND_RULES] = result.act_s
    out = _checked(result, KIND_RULES, traj, step)
    return {k: float(v) for k, v in out["scores"].items()}


async def _code(orch: Submitter, traj: Trajectory, step: int, max_units: int) -> float:
    from tangram_reward.rules.code_reward import (
        CodeRewardRequest,
        CodeRewardUnavailable,
        code_reward,
    )

    req = CodeRewardRequest(response=traj.response or " ", tests=list(traj.task.tests))
    try:
        score = await code_reward(
            orch,
            req,
            trajectory_id=traj.id,
            step_id=step,
            priority=step_priority(step),
            max_units=max_units,
        )
    except CodeRewardUnavailable as exc:
        raise RewardFailed(f"code tests: {exc}") from None
    return float(score.reward)


async def _rm(orch: Submitter, traj: Trajectory, step: int) -> float:
    action = Action(
        kind=KIND_RM,
        trajectory_id=traj.id,
        step_id=step,
        priority=step_priority(step),
        demand={"reward_rm": 1.0},
        payload={"prompt": traj.task.prompt, "response": traj.response or " "},
    )
    result = await orch.submit(action)
    traj.action_act_s[KIND_RM] = result.act_s
    out = _checked(result, KIND_RM, traj, step)
    return float(out["reward"] if isinstance(out, dict) else out)


async def score_one(orch: Submitter, traj: Trajectory, cfg: RewardsConfig, step: int) -> None:
    """Fill ``traj.reward`` and ``traj.reward_parts``, or ``traj.infra_error``.

    Raises :class:`RewardError` when a reward function raised on this trajectory's task."""
    if traj.infra_error:
        return
    with _tracer.start_as_current_span(
        sc.SPAN_TRAIN_REWARD, attributes={sc.TRAJECTORY_ID: traj.id, sc.STEP_ID: step}
    ) as span:
        wanted = [r for r in RULES if r in cfg.weights]
        calls = []
        if wanted:
            calls.append(_rules(orch, traj, wanted, step))
        if "code" in cfg.weights:
            calls.append(_as_part("code", _code(orch, traj, step, cfg.code_test_units)))
        if "rm" in cfg.weights:
            calls.append(_as_part("rm", _rm(orch, traj, step)))
        try:
            parts: dict[str, float] = {}
            for got in await asyncio.gather(*calls):
                parts.update(got)
        except RewardFailed as exc:
            traj.infra_error = str(exc)
            span.set_attribute(sc.ERROR_TYPE, "RewardFailed")
            return
        traj.reward_parts = parts
        traj.reward = sum(cfg.weights[name] * parts[name] for name in cfg.weights)
        span.set_attribute(sc.REWARD, traj.reward)


async def _as_part(name: str, call: Any) -> dict[str, float]:
    return {name: await call}


async def score_all(
    orch: Submitter, trajs: list[Trajectory], cfg: RewardsConfig, step: int
) -> None:
    await asyncio.gather(*(score_one(orch, t, cfg, step) for t in trajs))
