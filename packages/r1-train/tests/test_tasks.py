"""Task generators, loaders and prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1_train.config import AgentConfig
from r1_train.prompts import R1_ZERO, render_prompt
from r1_train.tasks import CODE_PROBLEMS, Task, arithmetic, countdown, load_tasks


def test_arithmetic_answers_are_right_and_seeded() -> None:
    tasks = arithmetic(50, seed=3)
    assert tasks == arithmetic(50, seed=3)
    assert tasks != arithmetic(50, seed=4)
    for t in tasks:
        a, op, b = t.prompt.removeprefix("What is ").removesuffix("?").split()
        assert str(eval(f"{a}{op}{b}")) == t.answer  # our own digits


def test_countdown_is_always_solvable_with_the_given_numbers() -> None:
    from tangram_reward.rules.countdown_reward import countdown_score

    for t in countdown(30, seed=1):
        assert t.type == "countdown"
        assert t.target is not None
        assert 0 < t.target <= 1000
        assert str(t.target) in t.prompt
        # a brute-force check that some left-to-right expression reaches the target
        import itertools

        found = False
        for perm in itertools.permutations(t.numbers):
            for ops in itertools.product("+-*", repeat=len(perm) - 1):
                expr = str(perm[0])
                for op, n in zip(ops, perm[1:], strict=True):
                    expr = f"({expr} {op} {n})"
                if countdown_score(f"<answer>{expr}</answer>", t.numbers, t.target) == 1.0:
                    found = True
                    break
            if found:
                break
        assert found, t


def test_code_problems_have_tests() -> None:
    assert len(CODE_PROBLEMS) >= 5
    assert all(t.type == "code" and len(t.tests) >= 3 for t in CODE_PROBLEMS)


def test_load_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"id": 7, "prompt": "Square n", "tests": [{"stdin": "2", "expected_stdout": "4"}]},
        {"prompt": "Reach 6", "numbers": [1, 2, 3], "target": 6},
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = load_tasks(f)
    assert [t.type for t in tasks] == ["math", "code", "countdown"]
    assert [t.id for t in tasks] == ["t-1", "7", "t-3"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "t.parquet")
    assert load_tasks(tmp_path / "t.parquet")[0].answer == "4"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x", "anwser": "4"}', "row 1: anwser: Extra inputs are not permitted"),
        ('{"prompt": "x"}', "has nothing to score against"),
        ('{"prompt": "x", "numbers": [1]}', "needs 'target'"),
        ("[1, 2]", "each line must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl") as err:
        load_tasks(f)
    assert message in str(err.value)


def test_templates(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = Task(id="a", prompt="What is 2 + 3?", answer="5")
    one_turn, tools = AgentConfig(), AgentConfig(max_turns=2)
    r1 = render_prompt(task, "r1_zero", one_turn, None)
    assert r1.startswith(R1_ZERO)
    assert r1.endswith("Assistant:")
    assert "User: What is 2 + 3?" in r1
    assert "<code>" not in r1
    assert "between <code> and </code>" in render_prompt(task, "r1_zero", tools, None)
    chat = render_prompt(task, "chat", tools, tok)  # the tiny model's ChatML template
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert chat.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_prompt(task, "chat", tools, tok)
