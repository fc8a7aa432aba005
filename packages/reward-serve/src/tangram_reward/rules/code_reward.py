"""The code reward: the response's program against test cases, as one ``sandbox.run_tests``
action scheduled by tangram-core.

Why through tangram-core and not a direct sandbox call: the sandbox is a shared, elastic pool,
and a reward is just another action on it. The orchestrator queues it with the rollouts' tool
calls, retries it when a worker dies, and traces it. This module only builds the action and
reads its result, so reward-serve needs no dependency on the sandbox package. Anything that
can ``await submit(action)`` works: a local ``Orchestrator``, a ``RemoteOrchestrator`` handle.

An infrastructure failure is not a zero. When the sandbox cannot judge (the worker died past
its retries, or the request was rejected), :class:`CodeRewardUnavailable` is raised. The
trainer then drops or retries the sample instead of teaching the policy that good code scores
0. A response with no code block, or code that does not compile, scores 0: that is the
policy's doing.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tangram_core.actions import Action, ActionResult, ActionStatus
from tangram_core.elasticity import Amdahl, Elasticity

__all__ = [
    "CodeRewardRequest",
    "CodeRewardUnavailable",
    "CodeScore",
    "code_action",
    "code_reward",
    "extract_code",
]

#: The sandbox's languages, under SandboxFusion's names (``tangram_sandbox.languages``).
Language = Literal["python", "cpp", "c", "java", "nodejs", "typescript", "go", "rust", "bash"]
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)```", re.DOTALL)
#: Fence tags models write, to the language they mean.
_ALIASES: dict[str, Language] = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "c": "c",
    "java": "java",
    "javascript": "nodejs",
    "js": "nodejs",
    "node": "nodejs",
    "nodejs": "nodejs",
    "typescript": "typescript",
    "ts": "typescript",
    "go": "go",
    "golang": "go",
    "rust": "rust",
    "rs": "rust",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
}


class ActionSubmitter(Protocol):
    async def submit(self, action: Action) -> ActionResult: ...


class CodeRewardUnavailable(RuntimeError):
    """The sandbox could not judge this response; do not score it as 0."""


class CodeRewardRequest(BaseModel):
    """One response and the tests its code must pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    response: str = Field(min_length=1, description="The model's full response.")
    tests: list[dict[str, Any]] = Field(
        min_length=1,
        description="Sandbox test cases: {'stdin', 'expected_stdout'} or "
        "{'fn', 'args', 'kwargs', 'expected'}.",
    )
    language: Language = "python"
    limits: dict[str, Any] | None = Field(None, description="Per-test sandbox limits.")
    scoring: Literal["fraction", "all"] = Field(
        "fraction", description="'fraction': the pass fraction; 'all': 1 only if all pass."
    )


class CodeScore(BaseModel):
    model_config = ConfigDict(frozen=True)
    reward: float
    pass_fraction: float
    status: str = Field(description="The sandbox's status, or 'no_code'.")
    passed: int = 0
    total: int = 0


def extract_code(response: str, language: Language = "python") -> str | None:
    """The last fenced code block of ``language`` after the reasoning (an untagged block
    counts), or ``None``. Reasoning inside ``<think>`` is skipped: R1-style responses draft code
    there and give the answer after it."""
    answer = response.rsplit("</think>", 1)[-1]
    found: str | None = None
    for tag, body in _FENCE.findall(answer):
        tag = tag.lower()
        if not tag or _ALIASES.get(tag) == language:
            found = body
    return found


def code_action(
    req: CodeRewardRequest,
    *,
    trajectory_id: str | None = None,
    step_id: int | None = None,
    priority: int = 0,
    max_units: int = 1,
) -> Action | None:
    """The ``sandbox.run_tests`` action for ``req``, or ``None`` when it holds no code;
    ``priority`` is the caller's (a trainer runs older steps first).

    ``max_units`` > 1 makes the action elastic: given spare workers, the scheduler may start it
    on up to that many (never more than there are tests), and the sandbox spreads the tests over
    them. Each share compiles the program again, hence the 10% serial part of the speed-up."""
    if max_units < 1:
        raise ValueError(f"code_action(max_units={max_units}): need at least one unit")
    code = extract_code(req.response, req.language)
    if code is None:
        return None
    payload: dict[str, Any] = {"code": code, "language": req.language, "tests": req.tests}
    if req.limits is not None:
        payload["limits"] = req.limits
    return Action(
        kind="sandbox.run_tests",
        demand={"cpu": 1},
        elasticity=Elasticity(
            max_units=max(1, min(max_units, len(req.tests))),
            speedup=Amdahl(parallel_fraction=0.9),
        ),
        trajectory_id=trajectory_id,
        step_id=step_id,
        priority=priority,
        payload=payload,
    )


def score_result(req: CodeRewardRequest, result: ActionResult) -> CodeScore:
    """Turn the action's result into a reward; raises :class:`CodeRewardUnavailable` for
    failures of the infrastructure."""
    if result.status is not ActionStatus.OK:
        if result.status is ActionStatus.ERROR and result.error_type == "InvalidPayload":
            raise ValueError(f"code reward: the sandbox refused the request: {result.error}")
        raise CodeRewardUnavailable(
            f"code reward: sandbox action {result.status.value}: {result.error}"
        )
    out = result.output
    status = str(out.get("status"))
    if status == "sandbox_error":
        raise CodeRewardUnavailable(f"code reward: {out.get('error')}")
    total = int(out.get("total", len(req.tests)))
    passed = int(out.get("passed", 0))
    fraction = float(out.get("pass_fraction", 0.0)) if status == "ok" else 0.0
    if req.scoring == "all":
        reward = 1.0 if status == "ok" and passed == total else 0.0
    else:
        reward = fraction
    return CodeScore(
        reward=reward, pass_fraction=fraction, status=status, passed=passed, total=total
    )


async def code_reward(
    submitter: ActionSubmitter,
    req: CodeRewardRequest,
    *,
    trajectory_id: str | None = None,
    step_id: int | None = None,
    priority: int = 0,
    max_units: int = 1,
) -> CodeScore:
    """Score ``req`` by running its code's tests through ``submitter`` (an orchestrator);
    ``max_units`` as in :func:`code_action`."""
    action = code_action(
        req, trajectory_id=trajectory_id, step_id=step_id, priority=priority, max_units=max_units
    )
    if action is None:
        return CodeScore(reward=0.0, pass_fraction=0.0, status="no_code", total=len(req.tests))
    return score_result(req, await submitter.submit(action))
