"""The agent loop's parsing, observations, batch selection, and a real sandbox failure mid-step."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from r1_train.agent_loop import Trajectory, find_tool_call, observation, rollout
from r1_train.config import AgentConfig, RolloutConfig, TrainConfig
from r1_train.step import select_for_training
from r1_train.tasks import Task
from tangram_core.actions import ActionResult, ActionStatus

AGENT = AgentConfig(max_turns=3)
TASK = Task(id="t", prompt="What is 6 * 7?", answer="42")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("let me run <code>print(6*7)</code>", "print(6*7)"),
        ("<code>a=1</code> then <code>print(a)</code>\n", "print(a)"),  # the last block
        ("<code>print(1)</code> and then I kept talking", None),  # the turn did not end on it
        ("<code>print(1)", None),  # unclosed: cut by the token budget
        ("<code>   </code>", None),  # empty
        ("no tools here", None),
    ],
)
def test_find_tool_call(text: str, code: str | None) -> None:
    assert find_tool_call(text, AGENT) == code


def _result(status: ActionStatus, output: object = None, error: str | None = None) -> ActionResult:
    return ActionResult(
        action_id="a", kind="sandbox.run", status=status, output=output, error=error,
        submit_time=0.0, start_time=0.1, end_time=0.2,
    )  # fmt: skip


def test_observation_shows_stdout_and_the_last_error_line_clipped() -> None:
    ok = _result(ActionStatus.OK, {"status": "ok", "stdout": "42\n", "stderr": ""})
    assert observation(ok, AGENT) == "\n<output>\n42\n</output>\n"
    crash = {
        "status": "runtime_error",
        "stdout": "",
        "stderr": "Traceback\n  x\nZeroDivisionError: x",
    }
    assert "ZeroDivisionError: x" in observation(_result(ActionStatus.OK, crash), AGENT)
    long = _result(ActionStatus.OK, {"status": "ok", "stdout": "x" * 5000})
    text = observation(long, AgentConfig(max_observation_chars=100))
    assert "x" * 100 + "...(truncated)" in text
    assert "x" * 101 not in text


def _cfg(tmp_path: Path, **grpo: object) -> TrainConfig:
    (tmp_path / "config.json").write_text("{}")
    return TrainConfig.model_validate(
        {"model": {"path": tmp_path}, "rollout": {"group_size": 2}, "grpo": grpo}
    )


def _trajs(rewards: list[float | None], errors: dict[int, str] | None = None) -> list[Trajectory]:
    out = []
    for i, r in enumerate(rewards):
        t = Trajectory(TASK, i // 2, i % 2, [1, 2], [3, 4, 5], [1, 1, 1], [0.0] * 3)
        t.reward = r
        t.infra_error = (errors or {}).get(i)
        out.append(t)
    return out


def test_a_group_with_an_infra_error_is_dropped_not_scored_zero(tmp_path: Path) -> None:
    trajs = _trajs([1.0, 0.0, None, 1.0], errors={2: "sandbox.run infra_error"})
    kept, info = select_for_training(trajs, _cfg(tmp_path))
    assert info == {"infra_dropped": 1, "flat_dropped": 0, "nonfinite_rewards": 0}
    assert [t.group for t, _ in kept] == [0, 0]
    first, second = (a for _, a in kept)
    assert first > 0 > second


def test_dynamic_sampling_drops_flat_groups(tmp_path: Path) -> None:
    trajs = _trajs([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    kept, info = select_for_training(trajs, _cfg(tmp_path, dynamic_sampling=True))
    assert info["flat_dropped"] == 2
    assert {t.group for t, _ in kept} == {1}
    kept, info = select_for_training(trajs, _cfg(tmp_path))
    assert len(kept) == 6
    assert info["flat_dropped"] == 0


def test_a_sandbox_that_dies_mid_step_is_an_infra_error(tiny_model_dir: Path) -> None:
    """Real pool, real kill: every worker is SIGKILLed while the tool calls run.

    The orchestrator has no retry budget, so the actions end INFRA_ERROR; the trajectories carry
    ``infra_error``, get no reward, and their groups are dropped from the batch. No engine is
    needed: the prefilled tool call runs before the first generation, and no trajectory survives
    it, so the loop never generates (the engine argument is never touched).
    """
    from transformers import AutoTokenizer

    from tangram_core.orchestrator import Orchestrator, OrchestratorConfig
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.isolation import capabilities
    from tangram_sandbox.manager import SandboxManager

    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = AgentConfig(max_turns=2, prefill="<code>import time; time.sleep(20)</code>")

    async def go() -> list[Trajectory]:
        manager = SandboxManager(PoolConfig(min_workers=2, max_workers=2))
        async with Orchestrator([manager], config=OrchestratorConfig(max_retries=0)) as orch:
            job = asyncio.ensure_future(
                rollout(
                    None,  # type: ignore[arg-type]  # never reached, see the docstring
                    orch,
                    tok,
                    [(TASK, "q")],
                    rollout_cfg=RolloutConfig(group_size=2),
                    agent=agent,
                    step=0,
                    seed=0,
                )
            )
            while manager.pool.busy < 2:
                await asyncio.sleep(0.05)
            for worker in list(manager.pool._workers):
                os.kill(worker.pid, signal.SIGKILL)
            return await asyncio.wait_for(job, 60)

    trajs = asyncio.run(go())
    assert [t.infra_error is not None for t in trajs] == [True, True]
    assert all("infra_error" in (t.infra_error or "") for t in trajs)
    assert all(t.reward is None for t in trajs)
    assert all(t.completion_ids == [] for t in trajs)  # nothing half-appended


def test_an_older_steps_tool_call_runs_before_a_younger_ones_queued_earlier() -> None:
    """Async rollouts keep several steps in flight; the trainer waits on the oldest, so its tool
    calls go first. One real sandbox worker, held busy: step 3's call queues first, step 1's
    second, and step 1's starts first. Without step priorities the scheduler would start them in
    arrival order (equal estimates), and this test would fail."""
    from r1_train.agent_loop import _run_tool
    from tangram_core.orchestrator import Orchestrator
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.isolation import capabilities
    from tangram_sandbox.manager import SandboxManager

    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")
    agent = AgentConfig(tool_wall_s=10)

    def traj(i: int) -> Trajectory:
        return Trajectory(TASK, i, 0, [1], [], [], [])

    async def go() -> dict[int, ActionResult]:
        manager = SandboxManager(PoolConfig(min_workers=1, max_workers=1))
        async with Orchestrator([manager]) as orch:
            blocker = asyncio.ensure_future(
                _run_tool(orch, traj(0), "import time; time.sleep(1.0)", agent, step=0)
            )
            while manager.pool.busy < 1:
                await asyncio.sleep(0.02)
            young = asyncio.ensure_future(_run_tool(orch, traj(1), "print(3)", agent, step=3))
            await asyncio.sleep(0.1)  # queued, strictly before the older step's call
            old = asyncio.ensure_future(_run_tool(orch, traj(2), "print(1)", agent, step=1))
            done = await asyncio.gather(blocker, young, old)
            return {0: done[0], 3: done[1], 1: done[2]}

    results = asyncio.run(go())
    assert all(r.status is ActionStatus.OK for r in results.values())
    assert results[1].submit_time > results[3].submit_time
    assert results[1].start_time < results[3].start_time


def test_a_code_reward_spreads_its_tests_over_idle_sandbox_workers(span_exporter: Any) -> None:
    """``rewards.code_test_units`` makes each code-tests reward elastic: on an idle pool of 4
    real sandbox workers, one reward's 8 tests run on all 4, and the reward is the same."""
    from r1_train.config import RewardsConfig
    from r1_train.rewards import score_one
    from tangram_core import semconv as sc
    from tangram_core.orchestrator import Orchestrator
    from tangram_sandbox.config import PoolConfig
    from tangram_sandbox.isolation import capabilities
    from tangram_sandbox.manager import SandboxManager

    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")
    tests = tuple({"stdin": str(i), "expected_stdout": str(i * i)} for i in range(8))
    task = Task(id="square", prompt="Square the input.", tests=tests)
    code = "```python\nn = int(input())\nprint(n * n if n != 7 else 0)\n```"

    async def go(units: int) -> tuple[float | None, list[int]]:
        span_exporter.clear()
        manager = SandboxManager(PoolConfig(min_workers=4, max_workers=4))
        traj = Trajectory(task, 0, 0, [1], texts=[code])
        async with Orchestrator([manager]) as orch:
            cfg = RewardsConfig(weights={"code": 1.0}, code_test_units=units)
            await score_one(orch, traj, cfg, step=0)
        spans = [s for s in span_exporter.get_finished_spans() if s.name == sc.SPAN_ACTION]
        return traj.reward, [s.attributes[sc.ACTION_UNITS] for s in spans]

    assert asyncio.run(go(1)) == (7 / 8, [1])
    assert asyncio.run(go(4)) == (7 / 8, [4])
