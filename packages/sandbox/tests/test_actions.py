"""The sandbox's action contract: what r1-train and reward-serve build is what the manager reads."""

from __future__ import annotations

import pytest

from tangram_core.actions import Action, ActionResult, ActionStatus, InvalidPayload
from tangram_sandbox.actions import (
    KIND_RUN,
    KIND_RUN_TESTS,
    request_of,
    run_action,
    run_tests_action,
)
from tangram_sandbox.manager import SandboxManager
from tangram_sandbox.models import (
    Limits,
    RunRequest,
    RunResult,
    RunStatus,
    RunTestsRequest,
    RunTestsResult,
    StdinTest,
)


def test_built_actions_read_back_as_the_same_requests() -> None:
    run = RunRequest(code="print(1)", limits=Limits(wall_s=2, memory_mb=128))
    action = run_action(run, trajectory_id="t", step_id=3, priority=-3)
    assert (action.kind, action.demand, action.step_id) == (KIND_RUN, {"cpu": 1.0}, 3)
    assert request_of(action) == run
    # only what the caller set travels (defaults are filled again where it is read)
    assert action.payload == {"code": "print(1)", "limits": {"wall_s": 2.0, "memory_mb": 128}}

    tests = RunTestsRequest(
        code="x", tests=[StdinTest(stdin=str(i), expected_stdout="") for i in range(3)]
    )
    wide = run_tests_action(tests, max_units=8)
    assert wide.kind == KIND_RUN_TESTS
    assert wide.elasticity.max_units == 3, "never more units than tests"
    assert request_of(wide) == tests
    assert SandboxManager.kinds == {KIND_RUN, KIND_RUN_TESTS}
    with pytest.raises(ValueError, match="max_units=0"):
        run_tests_action(tests, max_units=0)


def test_a_bad_payload_names_every_field_and_is_the_callers_fault() -> None:
    bad = Action(kind=KIND_RUN_TESTS, payload={"code": "x", "tests": [], "limits": {"wall_s": -1}})
    with pytest.raises(InvalidPayload) as info:
        request_of(bad)
    assert "tests" in str(info.value)
    assert "limits.wall_s" in str(info.value)
    with pytest.raises(InvalidPayload, match="not a sandbox action"):
        request_of(Action(kind="reward.rm", payload={"code": "x"}))


def _result(status: ActionStatus, output: object = None) -> ActionResult:
    return ActionResult(
        action_id="a", kind=KIND_RUN, status=status, output=output, submit_time=0.0, end_time=1.0
    )


def test_results_read_back_only_when_the_sandbox_judged() -> None:
    judged = RunResult(status=RunStatus.OK, stdout="1\n", exit_code=0)
    assert RunResult.from_action(_result(ActionStatus.OK, judged.model_dump(mode="json"))) == judged
    assert RunResult.from_action(_result(ActionStatus.INFRA_ERROR)) is None
    assert RunTestsResult.from_action(_result(ActionStatus.TIMEOUT)) is None
    refused = ActionResult(
        action_id="a",
        kind=KIND_RUN,
        status=ActionStatus.ERROR,
        error="tests: too short",
        error_type=InvalidPayload.__name__,
        submit_time=0.0,
        end_time=1.0,
    )
    assert refused.invalid_payload
    assert not _result(ActionStatus.ERROR).invalid_payload
