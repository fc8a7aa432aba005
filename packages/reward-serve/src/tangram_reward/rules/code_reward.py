"""The code reward: the response's program against test cases, as one ``sandbox.run_tests``
action scheduled by tangram-core.

Why through tangram-core and not a direct sandbox call: the sandbox is a shared, elastic pool,
and a reward is just another action on it. The orchestrator queues it with the rollouts' tool
calls, retries it when a worker dies, and traces it. This module builds the action and reads
its result through the sandbox's own contract (:mod:`tangram_sandbox.actions`, pydantic and
tangram-core only), imported when a code reward is first built: reward-serve installs without
the sandbox, and a code reward needs one anyway. Anything that can ``await submit(action)``
works: a local ``Orchestrator``, a ``RemoteOrchestrator`` handle.

An infrastructure failure is not a zero. When the sandbox cannot judge (the worker died past
its retries, or the request was rejected), :class:`CodeRewardUnavailable` is raised. The
trainer then drops or retries the sample instead of teaching the policy that good code scores
0. A response with no code block, or code that does not compile, scores 0: that is the
policy's doing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tangram_core.actions import Action, ActionResult, Submitter

if TYPE_CHECKING:
    from types import ModuleType

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


def _sandbox() -> ModuleType:
    """:mod:`tangram_sandbox.actions`, or an error that says what to install."""
    try:
        from tangram_sandbox import actions
    except ImportError as exc:
        raise ImportError(
            "the code reward runs programs in the sandbox and builds its actions with the "
            f"sandbox's contract, which is not installed ({exc}): pip install packages/sandbox "
            "(or tangram-sandbox)"
        ) from exc
    return actions


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
    contract = _sandbox()
    from tangram_sandbox.models import RunTestsRequest

    fields: dict[str, Any] = {"code": code, "language": req.language, "tests": req.tests}
    if req.limits is not None:
        fields["limits"] = req.limits
    try:
        request = RunTestsRequest.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"code reward: the sandbox refused the request: {problems}") from None
    action: Action = contract.run_tests_action(
        request,
        max_units=max_units,
        trajectory_id=trajectory_id,
        step_id=step_id,
        priority=priority,
    )
    return action


def score_result(req: CodeRewardRequest, result: ActionResult) -> CodeScore:
    """Turn the action's result into a reward; raises :class:`CodeRewardUnavailable` for
    failures of the infrastructure."""
    from tangram_sandbox.models import RunStatus, RunTestsResult

    run = RunTestsResult.from_action(result)
    if run is None:
        if result.invalid_payload:
            raise ValueError(f"code reward: the sandbox refused the request: {result.error}")
        raise CodeRewardUnavailable(
            f"code reward: sandbox action {result.status.value}: {result.error}"
        )
    if run.status is RunStatus.SANDBOX_ERROR:
        raise CodeRewardUnavailable(f"code reward: {run.error}")
    ok = run.status is RunStatus.OK
    fraction = run.pass_fraction if ok else 0.0
    all_passed = float(ok and run.passed == run.total)
    reward = all_passed if req.scoring == "all" else fraction
    return CodeScore(
        reward=reward,
        pass_fraction=fraction,
        status=run.status.value,
        passed=run.passed,
        total=run.total,
    )


async def code_reward(
    submitter: Submitter,
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
