"""reward-serve's code reward end to end: response -> sandbox.run_tests action -> tangram-core
orchestrator -> real sandbox pool -> reward."""

from __future__ import annotations

import asyncio

import pytest

from tangram_core.orchestrator import Orchestrator
from tangram_reward.rules.code_reward import CodeRewardRequest, code_reward
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.isolation import capabilities
from tangram_sandbox.manager import SandboxManager

TESTS = [{"stdin": f"{i}", "expected_stdout": f"{i * i}"} for i in range(4)]


@pytest.fixture(scope="module", autouse=True)
def _needs_sandbox() -> None:
    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")


def test_code_reward_runs_the_tests_in_the_sandbox() -> None:
    responses = {
        "right": "<think>square it</think>\n```python\nn = int(input())\nprint(n * n)\n```",
        "wrong": "```python\nn = int(input())\nprint(n + n)\n```",  # right for 0 and 2 only
        "none": "I cannot solve this.",
        "cpp": (
            "```cpp\n#include <cstdio>\n"
            'int main(){long n;scanf("%ld",&n);printf("%ld\\n",n*n);}\n```'
        ),
    }

    async def go() -> dict[str, float]:
        async with Orchestrator([SandboxManager(PoolConfig(min_workers=1, max_workers=2))]) as orch:
            scores = {}
            for name, response in responses.items():
                language = "cpp" if name == "cpp" else "python"
                req = CodeRewardRequest(response=response, tests=TESTS, language=language)
                scores[name] = (await code_reward(orch, req, trajectory_id=name)).reward
            return scores

    assert asyncio.run(go()) == {"right": 1.0, "wrong": 0.5, "none": 0.0, "cpp": 1.0}
