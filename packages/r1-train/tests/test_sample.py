"""``r1-train sample`` without an engine: its config, the verdicts, what is written, and how a
resume reads back what a killed run left (torn lines, rows no counts line covers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1_train.agent_loop import Trajectory
from r1_train.cli import main
from r1_train.config import ConfigError
from r1_train.sample import kept, load_sample_config, verdict
from r1_train.sample_io import (
    PromptCounts,
    SampleDataError,
    Writer,
    check_resumable,
    counts_path,
    prepare,
    recover,
    summarise,
)
from r1_train.tasks import Task


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def make_config(model_dir: Path, out: Path, *overrides: str):
    return load_sample_config(None, [f"model.path={model_dir}", f"sample.out={out}", *overrides])


def make_traj(task: Task, *, parts: dict[str, float] | None = None, infra: str | None = None):
    traj = Trajectory(task=task, group=0, member=0, prompt_ids=[1], texts=["x"])
    traj.infra_error = infra
    if parts is not None:
        traj.reward_parts = parts
        traj.reward = sum(parts.values())
    return traj


def write_prompts(out: Path, per_prompt: list[tuple[list[str], int]]) -> Writer:
    """A writer that has written one prompt per item: (verdicts, rows kept)."""
    writer = Writer(out, prepare(out, resume=False))
    for i, (verdicts, k) in enumerate(per_prompt):
        rows = [{"messages": [{"role": "assistant", "content": f"{i}-{j}"}]} for j in range(k)]
        writer.add(i, f"t{i}", verdicts, rows)
    return writer


# -- config -----------------------------------------------------------------------------------


def test_n_defaults_to_the_group_size_and_rewards_to_the_tasks_check(model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "o.jsonl", "rollout.group_size=6")
    assert cfg.n == 6
    assert cfg.rewards is None
    cfg = make_config(model_dir, tmp_path / "o.jsonl", "sample.n=3", "task.kind=countdown")
    assert cfg.n == 3
    assert cfg.eval_config().eval.samples == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample.n=0"], "sample.n: Input should be greater than or equal to 1"),
        (["sample.num_generations=4"], "sample.num_generations: Extra inputs are not permitted"),
        (["sample.max_per_prompt=0"], "sample.max_per_prompt: Input should be greater"),
        (["rewards.weights={format: 1}"], "lacks ['math'], the check that accepts a math answer"),
        (["task.kind=code", "rewards.weights={math: 1}"], "lacks ['code']"),
        (["rewards.weights={countdown: 1}", "sample.min_reward=1"], "needs task.kind 'countdown'"),
    ],
)
def test_bad_fields_are_named(model_dir, tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match="invalid sample config") as err:
        make_config(model_dir, tmp_path / "o.jsonl", *overrides)
    assert message in str(err.value)


def test_sample_out_is_required(model_dir) -> None:
    with pytest.raises(ConfigError, match="sample: Field required"):
        load_sample_config(None, [f"model.path={model_dir}"])


def test_a_training_yaml_is_read_as_it_is(model_dir, tmp_path) -> None:
    yaml = tmp_path / "train.yaml"
    yaml.write_text(
        f"model: {{path: {model_dir}}}\nrollout: {{group_size: 5}}\ngrpo: {{beta: 0.1}}\n"
        "rewards: {weights: {math: 1.0, format: 0.5}}\n"
    )
    cfg = load_sample_config(yaml, [f"sample.out={tmp_path / 'o.jsonl'}"])
    assert cfg.n == 5
    assert cfg.rewards is not None
    assert cfg.rewards.weights["format"] == 0.5


# -- verdicts and what is kept ----------------------------------------------------------------


def test_verdicts_use_the_tasks_own_check_or_min_reward(model_dir, tmp_path) -> None:
    task = Task(id="a", prompt="What is 1 + 1?", answer="2")
    plain = make_config(model_dir, tmp_path / "o.jsonl")
    assert verdict(make_traj(task, parts={"math": 1.0}), plain) == "accepted"
    assert verdict(make_traj(task, parts={"math": 0.0, "format": 1.0}), plain) == "rejected"
    assert verdict(make_traj(task, infra="reward.rules timeout"), plain) == "infra_failed"
    cut = make_traj(task, parts={"math": 1.0})
    cut.truncated = True  # right, but cut at max_new_tokens
    assert verdict(cut, plain) == "rejected"
    keep_cut = make_config(model_dir, tmp_path / "o.jsonl", "sample.drop_truncated=false")
    assert verdict(cut, keep_cut) == "accepted"
    lenient = make_config(
        model_dir,
        tmp_path / "o.jsonl",
        "rewards.weights={math: 1, format: 0.5}",
        "sample.min_reward=0.5",
    )
    assert verdict(make_traj(task, parts={"math": 0.0, "format": 0.5}), lenient) == "accepted"
    assert verdict(make_traj(task, parts={"math": 0.0, "format": 0.0}), lenient) == "rejected"


def test_kept_dedups_and_caps_in_sampling_order(model_dir, tmp_path) -> None:
    answers = ["a", "b", "a", "c", "d"]
    verdicts = ["accepted", "rejected", "accepted", "accepted", "accepted"]
    cfg = make_config(model_dir, tmp_path / "o.jsonl")
    assert kept(answers, verdicts, cfg) == ["a", "c", "d"]
    cfg = make_config(model_dir, tmp_path / "o.jsonl", "sample.max_per_prompt=2")
    assert kept(answers, verdicts, cfg) == ["a", "c"]
    cfg = make_config(model_dir, tmp_path / "o.jsonl", "sample.dedup=false")
    assert kept(answers, verdicts, cfg) == ["a", "a", "c", "d"]


# -- counts -----------------------------------------------------------------------------------


def test_counts_add_up_to_n_and_infra_failures_are_not_rejections(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    writer = write_prompts(
        out,
        [
            (["accepted", "rejected", "infra_failed", "accepted"], 1),
            (["rejected", "rejected", "rejected", "rejected"], 0),
        ],
    )
    writer.close()
    rows = [json.loads(x) for x in counts_path(out).read_text().splitlines()]
    assert rows[0] | {"infra_error": None} == {
        "index": 0,
        "task_id": "t0",
        "n": 4,
        "accepted": 2,
        "rejected": 1,
        "infra_failed": 1,
        "written": 1,
        "rows": 1,
        "truncated": 0,
        "infra_error": None,
    }
    assert rows[1]["rows"] == 1
    assert rows[1]["rejected"] == 4
    total = summarise(recover(out).done.values())
    assert total["samples"] == 8
    assert total["infra_failed"] == 1
    assert total["acceptance_rate"] == pytest.approx(2 / 7)  # infra failures are not judged
    with pytest.raises(ValueError, match="do not add up"):
        PromptCounts(0, "t", n=3, accepted=1, rejected=1, infra_failed=0, written=1, rows=1)


# -- resume -----------------------------------------------------------------------------------


def test_an_existing_output_needs_resume(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    write_prompts(out, [(["accepted"], 1)]).close()
    with pytest.raises(ConfigError, match="already holds samples; pass --resume"):
        prepare(out, resume=False)
    assert sorted(prepare(out, resume=True).done) == [0]


def test_a_torn_counts_line_and_uncovered_rows_are_dropped(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    write_prompts(out, [(["accepted", "accepted"], 2), (["accepted", "rejected"], 1)]).close()
    whole_out, whole_counts = out.read_bytes(), counts_path(out).read_bytes()
    # killed while writing prompt 2: its two rows are in, its counts line is torn
    with open(out, "ab") as f:
        f.write(b'{"messages": [{"role": "assistant", "content": "2-0"}]}\n{"mess')
    with open(counts_path(out), "ab") as f:
        f.write(b'{"index": 2, "task_id": "t2", "n"')
    progress = recover(out)
    assert sorted(progress.done) == [0, 1]
    assert progress.rows == 3
    assert progress.torn_counts
    assert progress.dropped_rows == 2
    assert out.read_bytes() == whole_out
    assert counts_path(out).read_bytes() == whole_counts
    writer = Writer(out, progress)  # the resumed run writes prompt 2 once
    writer.add(2, "t2", ["accepted"], [{"messages": [{"role": "assistant", "content": "2-0"}]}])
    writer.close()
    assert len(out.read_text().splitlines()) == 4
    assert recover(out).rows == 4


def test_a_damaged_counts_row_is_refused_with_its_row(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    write_prompts(out, [(["accepted"], 1)]).close()
    with open(counts_path(out), "a") as f:
        f.write("not json\n")
    with pytest.raises(SampleDataError, match=r"o\.counts\.jsonl: row 2: not a counts row"):
        recover(out)


def test_an_output_shorter_than_its_counts_is_refused(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    write_prompts(out, [(["accepted", "accepted"], 2)]).close()
    out.write_text(out.read_text().splitlines()[0] + "\n")
    with pytest.raises(SampleDataError, match=r"holds 1 whole rows but .* says 2"):
        recover(out)


def test_resume_refuses_other_tasks_or_another_n(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    write_prompts(out, [(["accepted", "rejected"], 1)]).close()
    progress = recover(out)
    check_resumable(progress, ["t0", "t1"], 2, out)
    with pytest.raises(ConfigError, match="has task 't0' at position 0, but this config puts"):
        check_resumable(progress, ["u0"], 2, out)
    with pytest.raises(ConfigError, match=r"sampled with sample\.n 2, this config asks for 4"):
        check_resumable(progress, ["t0"], 4, out)


# -- the command line -------------------------------------------------------------------------


def test_cli_exits_2_naming_the_problem(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    assert main(["sample", f"model.path={model_dir}", f"sample.out={out}", "sample.n=-1"]) == 2
    assert "sample.n: Input should be greater than or equal to 1" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    assert main(["sample", "--config", str(missing)]) == 2
    assert f"config file {str(missing)!r} does not exist" in capsys.readouterr().err


def test_reading_the_config_imports_no_torch(imported_modules) -> None:
    """A bad config or an output in the way is answered at once, not after torch loads."""
    loaded = imported_modules("r1_train.sample")
    assert not loaded & {"torch", "vllm", "ray", "transformers"}, sorted(loaded)
