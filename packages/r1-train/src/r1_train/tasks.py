"""Training tasks, offline: generators (arithmetic, Countdown), built-in code problems, and loaders.

A :class:`Task` is what the trainer samples a group for: the question, the ground truth its
reward needs, and (for code) the tests. Loaders read local JSONL or Parquet with this schema,
one object per row::

    {"prompt": "What is 2 + 3?", "answer": "5"}  # math
    {"prompt": "...", "tests": [{"stdin": "2", "expected_stdout": "4"}]}  # code
    {"prompt": "...", "numbers": [3, 5, 7], "target": 22}  # countdown

``id`` is optional (the row number otherwise). Unknown keys are refused, so that a misspelt
``anwser`` fails at load time and not as a silent reward of 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1_train.jsonl import field_errors, json_rows

if TYPE_CHECKING:
    from r1_train.config import TaskConfig

TaskType = Literal["math", "code", "countdown"]


class TaskDataError(ValueError):
    """The task data cannot be trained on (a bad row, a prompt too long): names file and row."""


class Task(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    prompt: str = Field(min_length=1)
    answer: str | None = None
    tests: tuple[dict[str, Any], ...] = ()
    numbers: tuple[int, ...] = ()
    target: int | None = None

    @property
    def type(self) -> TaskType:
        if self.tests:
            return "code"
        if self.numbers:
            return "countdown"
        return "math"

    @model_validator(mode="after")
    def _scorable(self) -> Task:
        if not self.prompt.strip():
            raise ValueError(f"task {self.id!r} has a blank 'prompt'")
        if self.answer is not None and not self.answer.strip():
            # the math verifier refuses a blank reference at scoring time, on every sample
            raise ValueError(
                f"task {self.id!r} has a blank 'answer' ({self.answer!r}): give the reference "
                "answer, or leave the key out for a code or countdown task"
            )
        if not (self.answer or self.tests or self.numbers):
            raise ValueError(
                f"task {self.id!r} has nothing to score against: give 'answer', 'tests' "
                "or 'numbers' + 'target'"
            )
        if self.numbers and self.target is None:
            raise ValueError(f"countdown task {self.id!r} needs 'target'")
        return self


def arithmetic(size: int, *, seed: int = 0, max_operand: int = 50) -> list[Task]:
    """Sums, differences and small products, with integer answers."""
    rng = random.Random(seed)
    tasks = []
    for i in range(size):
        op = rng.choice("+-*")
        a = rng.randint(1, max_operand)
        b = rng.randint(1, max_operand if op != "*" else min(max_operand, 12))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        tasks.append(
            Task(id=f"arith-{seed}-{i}", prompt=f"What is {a} {op} {b}?", answer=str(value))
        )
    return tasks


def countdown(size: int, *, seed: int = 0, max_operand: int = 50, count: int = 3) -> list[Task]:
    """Reach a target from the given numbers with + - * /, each number used at most once.

    Targets are built from a random expression over the numbers, so every task is solvable.
    """
    rng = random.Random(seed)
    tasks: list[Task] = []
    while len(tasks) < size:
        numbers = [rng.randint(1, max_operand) for _ in range(count)]
        value = numbers[0]
        for n in numbers[1:]:
            value = rng.choice([value + n, value - n, value * n])
        if not 0 < value <= 1000:
            continue
        shown = rng.sample(numbers, len(numbers))
        listed = ", ".join(map(str, shown))
        prompt = (
            f"Using the numbers [{listed}], create an equation that equals {value}. "
            "You can use + - * / and each number at most once."
        )
        tasks.append(
            Task(
                id=f"countdown-{seed}-{len(tasks)}",
                prompt=prompt,
                numbers=tuple(shown),
                target=value,
            )
        )
    return tasks


def _io(pairs: list[tuple[str, str]]) -> tuple[dict[str, Any], ...]:
    return tuple({"stdin": i, "expected_stdout": o} for i, o in pairs)


# Small problems with stdin/stdout tests, run in the sandbox by the 'code' reward.
CODE_PROBLEMS: tuple[Task, ...] = (
    Task(
        id="code-square",
        prompt="Read an integer n from standard input and print n squared.",
        tests=_io([("3", "9"), ("-4", "16"), ("0", "0"), ("12", "144")]),
    ),
    Task(
        id="code-sum-list",
        prompt="Read space-separated integers from one line of standard input and print their sum.",
        tests=_io([("1 2 3", "6"), ("10", "10"), ("-1 1 5", "5")]),
    ),
    Task(
        id="code-reverse",
        prompt="Read a line of text from standard input and print it reversed.",
        tests=_io([("abc", "cba"), ("racecar", "racecar"), ("ab cd", "dc ba")]),
    ),
    Task(
        id="code-fizz",
        prompt=(
            "Read an integer n. Print 'Fizz' if it is divisible by 3, 'Buzz' if by 5, "
            "'FizzBuzz' if by both, else the number itself."
        ),
        tests=_io([("3", "Fizz"), ("10", "Buzz"), ("30", "FizzBuzz"), ("7", "7")]),
    ),
    Task(
        id="code-max",
        prompt="Read space-separated integers from one line and print the largest.",
        tests=_io([("3 9 2", "9"), ("-5 -2", "-2"), ("7", "7")]),
    ),
    Task(
        id="code-vowels",
        prompt="Read a line of text and print how many vowels (a, e, i, o, u) it has.",
        tests=_io([("hello", "2"), ("sky", "0"), ("education", "5")]),
    ),
)


def _rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [dict(r) for r in pq.read_table(path).to_pylist()]
    rows = []
    for n, row in json_rows(path, TaskDataError):
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}: row {n}: each line must be a JSON object")
        rows.append(row)
    return rows


def load_tasks(path: Path) -> list[Task]:
    """Tasks from a local ``.jsonl`` or ``.parquet`` file (schema in the module docstring)."""
    tasks = []
    for n, row in enumerate(_rows(Path(path)), 1):
        row = {k: v for k, v in row.items() if v is not None}
        row.setdefault("id", f"{Path(path).stem}-{n}")
        row["id"] = str(row["id"])
        try:
            tasks.append(Task.model_validate(row))
        except ValidationError as exc:
            raise TaskDataError(f"{path}: row {n}: {field_errors(exc)}") from None
    if not tasks:
        raise TaskDataError(f"{path}: no tasks in the file")
    return tasks


def check_prompt_lengths(
    tasks: list[Task],
    render: Callable[[Task], str],
    tokenizer: Any,
    *,
    max_total_tokens: int,
    source: Path | None = None,
) -> None:
    """Refuse, at load time, every task whose rendered prompt leaves no room to answer.

    Why: the agent loop refuses such a prompt only when a step samples it, which can be many
    steps (and checkpoints) into a run. ``render`` is the trainer's prompt text (template and
    prefill included), tokenised as the rollout does. The rule is the rollout's: the prompt
    must be shorter than ``max_total_tokens - 1``. ``source`` is the task file, whose rows are
    named in the error (tasks come in row order); generated tasks are named by id.
    """
    bad = []
    for row, task in enumerate(tasks, 1):
        n = len(tokenizer.encode(render(task), add_special_tokens=False))
        if n >= max_total_tokens - 1:
            where = f"{source}: row {row} (id {task.id!r})" if source else f"task {task.id!r}"
            bad.append(f"{where}: the prompt is {n} tokens")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TaskDataError(
            f"{len(bad)} prompt(s) do not fit rollout.max_total_tokens ({max_total_tokens}), "
            f"which must exceed the prompt by at least 2 tokens: {shown}. Raise "
            "rollout.max_total_tokens or shorten or remove these rows"
        )


def tasks_of(task: TaskConfig) -> list[Task]:
    """The tasks a ``task`` section names (training's, ``eval_task``, ``r1-train eval``'s)."""
    if task.kind == "arithmetic":
        return arithmetic(task.size, seed=task.seed, max_operand=task.max_operand)
    if task.kind == "countdown":
        return countdown(task.size, seed=task.seed, max_operand=task.max_operand)
    if task.kind == "code":
        return list(CODE_PROBLEMS)
    assert task.path is not None  # the config validator guarantees it
    return load_tasks(task.path)
