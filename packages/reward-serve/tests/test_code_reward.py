"""The code reward's pure parts: finding the code, and reading a sandbox result as a reward."""

from __future__ import annotations

from typing import Any

import pytest

from tangram_core.actions import ActionResult, ActionStatus
from tangram_reward.rules.code_reward import (
    CodeRewardRequest,
    CodeRewardUnavailable,
    Language,
    code_action,
    extract_code,
    score_result,
)

TESTS = [{"stdin": "1", "expected_stdout": "1"}, {"stdin": "2", "expected_stdout": "4"}]


def test_extract_code_takes_the_last_block_after_the_reasoning() -> None:
    response = (
        "<think>draft:\n```python\nprint('draft')\n```\n</think>\n"
        "Answer:\n```python\nprint('first')\n```\nbetter:\n```py\nprint('final')\n```"
    )
    assert extract_code(response) == "print('final')\n"
    assert extract_code("```cpp\nint main(){}\n```", "cpp") == "int main(){}\n"
    assert extract_code("```cpp\nint main(){}\n```", "python") is None
    assert extract_code("```\nprint(1)\n```") == "print(1)\n", "untagged blocks count"
    assert extract_code("<think>```python\nx\n```</think> no code") is None


@pytest.mark.parametrize(
    ("tag", "language"),
    [("java", "java"), ("js", "nodejs"), ("ts", "typescript"), ("golang", "go"), ("rs", "rust")],
)
def test_extract_code_knows_the_sandboxes_other_languages(tag: str, language: Language) -> None:
    response = f"```python\nprint(1)\n```\n```{tag}\nbody\n```"
    assert extract_code(response, language) == "body\n"
    assert extract_code(response, "python") == "print(1)\n"
    action = code_action(CodeRewardRequest(response=response, tests=TESTS, language=language))
    assert action is not None
    assert action.payload["language"] == language


def test_no_code_means_no_action() -> None:
    assert code_action(CodeRewardRequest(response="I give up", tests=TESTS)) is None
    action = code_action(
        CodeRewardRequest(response="```python\nprint(1)\n```", tests=TESTS),
        trajectory_id="t7",
        step_id=3,
    )
    assert action is not None
    assert (action.kind, action.trajectory_id, action.step_id) == ("sandbox.run_tests", "t7", 3)
    assert action.payload["code"] == "print(1)\n"
    assert action.payload["tests"] == TESTS


def test_max_units_makes_the_tests_action_elastic_up_to_the_number_of_tests() -> None:
    req = CodeRewardRequest(response="```python\nprint(1)\n```", tests=TESTS)
    assert code_action(req).elasticity.max_units == 1
    wide = code_action(req, max_units=8)
    assert wide is not None
    assert (wide.elasticity.min_units, wide.elasticity.max_units) == (1, len(TESTS))
    with pytest.raises(ValueError, match="max_units=0"):
        code_action(req, max_units=0)


def result(status: ActionStatus, output: Any = None, **kw: Any) -> ActionResult:
    return ActionResult(
        action_id="a", kind="sandbox.run_tests", status=status, output=output,
        submit_time=0.0, end_time=1.0, **kw,
    )  # fmt: skip


def _verdicts(passed: int, total: int, status: str = "ok") -> dict[str, Any]:
    """A ``run_tests`` output as the sandbox writes it (``RunTestsResult.model_dump``)."""
    from tangram_sandbox.models import RunStatus, RunTestsResult, TestVerdict

    verdicts = [TestVerdict(index=i, passed=i < passed, status=RunStatus.OK) for i in range(total)]
    return RunTestsResult(
        status=RunStatus(status),
        passed=passed,
        total=total,
        pass_fraction=passed / total,
        verdicts=verdicts,
    ).model_dump(mode="json")


def test_scoring_fraction_all_and_compile_errors() -> None:
    req = CodeRewardRequest(response="```python\nx\n```", tests=TESTS)
    half = _verdicts(1, 2)
    assert score_result(req, result(ActionStatus.OK, half)).reward == 0.5
    strict = req.model_copy(update={"scoring": "all"})
    assert score_result(strict, result(ActionStatus.OK, half)).reward == 0.0
    assert score_result(strict, result(ActionStatus.OK, _verdicts(2, 2))).reward == 1.0
    broken = _verdicts(0, 2, "compile_error")
    assert score_result(req, result(ActionStatus.OK, broken)).reward == 0.0


def test_infrastructure_failures_are_not_zero_rewards() -> None:
    req = CodeRewardRequest(response="```python\nx\n```", tests=TESTS)
    with pytest.raises(CodeRewardUnavailable, match="infra_error"):
        score_result(req, result(ActionStatus.INFRA_ERROR, error="worker died 3 times"))
    gone = {**_verdicts(0, 2, "sandbox_error"), "error": "zygote gone"}
    with pytest.raises(CodeRewardUnavailable, match="zygote gone"):
        score_result(req, result(ActionStatus.OK, gone))
    with pytest.raises(ValueError, match="refused"):
        score_result(
            req, result(ActionStatus.ERROR, error="tests: bad", error_type="InvalidPayload")
        )


def test_tests_the_sandbox_cannot_read_are_refused_when_the_action_is_built() -> None:
    """The sandbox's own request model checks the tests before anything is queued."""
    req = CodeRewardRequest(response="```python\nx\n```", tests=[{"stdn": "1"}])
    with pytest.raises(ValueError, match="the sandbox refused the request: tests"):
        code_action(req)
