"""reward-serve's TRL plug-in (`tangram_reward.trl`): TRL's reward-function contract, scored by
our verifiers and the sandbox as tangram actions, and one real `GRPOTrainer` step with it."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest

from tangram_core import semconv
from tangram_reward.trl import TangramReward, TrlRewardConfig

GOOD = "<think>2 and 2</think><answer>4</answer>"
WRONG = "<think>hmm</think><answer>5</answer>"


@pytest.fixture(scope="module")
def rules_reward():
    with TangramReward(TrlRewardConfig(weights={"math": 1.0, "format": 0.5})) as reward:
        yield reward


def test_weighted_rules_and_none_where_nothing_applies(rules_reward):
    out = rules_reward(
        prompts=["2+2?", "2+2?", "2+2?"],
        completions=[GOOD, WRONG, "plain text"],
        answer=["4", "4", "4"],
    )
    assert out == [1.5, 0.5, 0.0]
    # a row without a reference gets no math; format still applies
    assert rules_reward(["p"], [GOOD], answer=[None]) == [0.5]
    only_math = TangramReward(TrlRewardConfig(weights={"math": 1.0}))
    try:
        assert only_math(["p", "p"], [GOOD, GOOD], answer=[None, float("nan")]) == [None, None]
        assert only_math(["p"], [GOOD]) == [None]  # the dataset has no answer column at all
    finally:
        only_math.close()


def test_conversational_completions_and_extra_trl_arguments(rules_reward):
    completions = [
        [{"role": "assistant", "content": GOOD}],
        [{"role": "assistant", "content": [{"type": "text", "text": WRONG}]}],
    ]
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    out = rules_reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2], [3]],
        answer=["4", "4"],
        trainer_state=None,
        log_extra=lambda *a: None,
    )
    assert out == [1.5, 0.5]


def test_bad_rows_raise_naming_the_row(rules_reward):
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        rules_reward(["p", "p"], [GOOD, GOOD], answer=["4"])
    with pytest.raises(ValueError, match="got 1 prompts but 2 completions"):
        rules_reward(["p"], [GOOD, GOOD], answer=["4", "4"])
    with pytest.raises(TypeError, match="list of chat messages"):
        rules_reward(["p"], [42], answer=["4"])


def test_countdown_needs_numbers_and_target_in_the_row():
    with TangramReward(TrlRewardConfig(weights={"countdown": 1.0})) as reward:
        out = reward(
            ["p", "p"],
            ["<answer>(3 + 5) * 2</answer>", "<answer>3 + 5</answer>"],
            numbers=[[3, 5, 2], None],
            target=[16, 16],
        )
    assert out[0] == 1.0
    assert out[1] is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"weights": {"rm": 1.0}}, "weights name 'rm' but rm_app is unset"),
        ({"weights": {"math": 1.0}, "rm_app": "rm"}, "weights have no 'rm' component"),
        ({"weights": {"math": float("inf")}}, "weights must be finite"),
        ({"weights": {"astrology": 1.0}}, "weights.astrology"),
        ({"weights": {}}, "at least 1 item"),
    ],
)
def test_config_errors_state_the_fix(config, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        TrlRewardConfig.model_validate(config)


def test_each_score_is_a_traced_tangram_action(rules_reward, span_exporter):
    rules_reward(["p", "p"], [GOOD, WRONG], answer=["4", "4"])
    actions = [s for s in span_exporter.get_finished_spans() if s.name == semconv.SPAN_ACTION]
    assert [a.attributes[semconv.ACTION_KIND] for a in actions] == ["reward.rules"] * 2
    assert sorted(a.attributes[semconv.TRAJECTORY_ID] for a in actions) == ["trl-x-0", "trl-x-1"]


def test_it_pickles_as_its_config_and_restarts_its_pools(rules_reward):
    copy = pickle.loads(pickle.dumps(rules_reward))
    try:
        assert copy.config == rules_reward.config
        assert copy(["p"], [GOOD], answer=["4"]) == [1.5]
    finally:
        copy.close()


def test_code_tests_run_in_the_sandbox(can_sandbox_here):
    tests = [{"stdin": "2", "expected_stdout": "4"}, {"stdin": "5", "expected_stdout": "10"}]
    half = "```python\nn = int(input())\nprint(4 if n == 2 else 0)\n```"
    with TangramReward(TrlRewardConfig(weights={"code": 1.0})) as reward:
        out = reward(
            ["p"] * 4,
            ["```python\nprint(int(input()) * 2)\n```", half, "no code here", "x"],
            tests=[tests, tests, tests, []],
        )
    assert out == [1.0, 0.5, 0.0, None]


@pytest.fixture
def can_sandbox_here() -> None:
    from tangram_sandbox.isolation import capabilities

    caps = capabilities()
    if not (caps.available("mount_ns") and caps.available("private_tmp")):
        pytest.skip(f"no mount namespace here: {caps.layer('mount_ns').detail}")


class RecordingReward(TangramReward):
    """The real reward function; it also keeps what TRL passed and what it answered."""

    def __init__(self, config: TrlRewardConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[list[Any], dict[str, Any], list[float | None]]] = []

    def __call__(self, prompts, completions, completion_ids=None, **columns):
        out = super().__call__(prompts, completions, completion_ids, **columns)
        self.calls.append((list(prompts), dict(columns), out))
        return out


@pytest.mark.slow
def test_one_grpo_step_of_trl_with_our_reward(tiny_model_dir, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # Half of the rows have no reference: math does not apply there, format does.
    rows = [
        {"prompt": f"What is {a} + {a}?", "answer": str(2 * a) if a % 2 else None}
        for a in range(1, 9)
    ]
    reward = RecordingReward(TrlRewardConfig(weights={"math": 1.0, "format": 0.5}))
    config = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-5,
        beta=0.0,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        seed=0,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    try:
        trainer.train()
    finally:
        reward.close()
    assert trainer.state.global_step == 1
    assert reward.calls, "TRL never called the reward function"
    answers = {r["prompt"]: r["answer"] for r in rows}
    scored: list[float] = []
    for prompts, columns, out in reward.calls:
        assert len(out) == len(prompts) == 4
        assert columns["answer"] == [answers[p] for p in prompts]  # rows line up
        assert columns["trainer_state"] is trainer.state
        for answer, value in zip(columns["answer"], out, strict=True):
            assert value is not None  # format applies to every row
            assert value in (0.0, 0.5, 1.0, 1.5) if answer else value in (0.0, 0.5)
            scored.append(value)
    logged = next(h for h in trainer.state.log_history if "rewards/tangram/mean" in h)
    assert math.isclose(logged["rewards/tangram/mean"], sum(scored) / len(scored), abs_tol=1e-6)
