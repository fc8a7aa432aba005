"""Config loading: YAML + overrides, and a clear error for every bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1_train.cli import main
from r1_train.config import ConfigError, load_config


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def test_yaml_then_overrides(tmp_path: Path, model_dir: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {{path: {model_dir}}}\ngrpo: {{beta: 0.001}}\nrun: {{steps: 3}}\n")
    cfg = load_config(f, ["run.steps=7", "rewards.weights={math: 1, format: 0.5}"])
    assert (cfg.run.steps, cfg.grpo.beta) == (7, 0.001)
    assert cfg.rewards.weights == {"math": 1.0, "format": 0.5}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grpo.betta=0.1"], "grpo.betta: unknown field; did you mean grpo.beta?"),
        (["grpo.epsilon_low=1.5"], "grpo.epsilon_low: Input should be less than 1"),
        (["rollout.group_size=1"], "rollout.group_size (1) must be >= 2 with grpo.scale 'group'"),
        (["rollout.max_new_tokens=600"], "max_new_tokens (600) must be < max_total_tokens (512)"),
        (["rewards.weights={rm: 1}"], "reward 'rm' needs rewards.rm_path"),
        (["rewards.weights={bleu: 1}"], "rewards.weights.bleu"),
        (["task.kind=code"], "task.kind 'code' is scored by tests: add 'code' to rewards.weights"),
        (["task.kind=jsonl"], "task.kind 'jsonl' needs task.path"),
        (["rollout.engine=openai"], "rollout.engine 'openai' needs rollout.server_url"),
        (["run.steps"], "override 'run.steps' must look like section.field=value"),
        (
            ["run.mode=async", "rollout.engine=openai", "rollout.server_url=http://x:1"],
            "run.mode 'async' updates weights between decode steps of the in-process engine",
        ),
        (["asynchronous.max_staleness=-1"], "asynchronous.max_staleness: Input should be greater"),
        (["asynchronous.on_update=wait"], "asynchronous.on_update: Input should be 'continue'"),
        (["grpo.is_correction=seq"], "grpo.is_correction: Input should be 'none', 'tis', 'mis'"),
        (["grpo.importance_sampling_level=seq"], "grpo.importance_sampling_level: Input should"),
        (["grpo.max_nonfinite_fraction=2"], "grpo.max_nonfinite_fraction: Input should be less"),
        (["grpo.use_bias_correction_kl=maybe"], "grpo.use_bias_correction_kl: Input should be"),
        (["grpo.is_cap=1"], "grpo.is_cap: Input should be greater than 1"),
    ],
)
def test_bad_fields_are_named(model_dir: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.path={model_dir}", *overrides])
    assert message in str(err.value)


def test_missing_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds no config\.json; point it at a local checkpoint"):
        load_config(None, [f"model.path={tmp_path}"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top"):
        load_config(bad)


def test_cli_prints_every_bad_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", f"model.path={tmp_path}", "grpo.beta=-1", "optim.lr=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.path" in err
    assert "grpo.beta: Input should be greater than or equal to 0" in err
    assert "optim.lr: Input should be greater than 0" in err


def test_run_under_torchrun_with_several_ranks_refuses_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """N ranks would each start a whole run (vLLM, Ray, sandboxes) and train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "one of 2 ranks (WORLD_SIZE=2)" in err
    assert "run once without torchrun and set cluster.trainer.ranks" in err


def test_shipped_configs_are_valid(model_dir: Path) -> None:
    """Each config under configs/ loads as the command it is for (``sample:``: r1-train
    sample; otherwise r1-train run)."""
    import yaml

    from r1_train.sample import load_sample_config

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if "sample" in (yaml.safe_load(path.read_text()) or {}):
            load_sample_config(path, [f"model.path={model_dir}"])
        else:
            load_config(path, [f"model.path={model_dir}"])


def test_cluster_fields_are_validated(model_dir: Path) -> None:
    base = [f"model.path={model_dir}"]
    cfg = load_config(None, [*base, "cluster.trainer.ranks=2", "cluster.rollout.engines=3"])
    assert cfg.cluster is not None
    assert (cfg.cluster.trainer.ranks, cfg.cluster.rollout.engines) == (2, 3)
    assert cfg.cluster.address == "auto"
    assert cfg.cluster.layout == "auto"
    assert load_config(None, base).cluster is None  # without cluster.*: the embedded run
    with pytest.raises(ConfigError, match=r"cluster.trainer.ranks: Input should be greater"):
        load_config(None, [*base, "cluster.trainer.ranks=0"])
    with pytest.raises(ConfigError, match=r"cluster.trainer.strategy: Input should be"):
        load_config(None, [*base, "cluster.trainer.strategy=SCATTER"])
    with pytest.raises(ConfigError, match=r"cluster.\* starts its own vLLM engines"):
        load_config(None, [*base, "cluster={}", "rollout.engine=openai", "rollout.server_url=x"])


@pytest.mark.parametrize(
    ("typed", "answer"),
    [
        ("num_generations=8", "num_generations: unknown field; did you mean rollout.group_size? "
         "(TRL's num_generations)"),
        ("max_completion_length=64", "did you mean rollout.max_new_tokens? (TRL's "
         "max_completion_length; per turn"),
        ("epsilon=0.2", "did you mean grpo.epsilon_low? (TRL's epsilon)"),
        ("num_iterations=2", "did you mean grpo.updates_per_batch? (TRL's num_iterations)"),
        ("grpo.kl_loss_coef=0.001", "grpo.kl_loss_coef: unknown field; did you mean grpo.beta? "
         "(verl's kl_loss_coef)"),
        ("actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.n: unknown field; did you "
         "mean rollout.group_size? (verl's actor_rollout_ref.rollout.n)"),
        ("grpo.betaa=0.1", "grpo.betaa: unknown field; did you mean grpo.beta?"),
        ("optim.micro_batch=2", "did you mean optim.micro_batch_size?"),
        ("grpo.zzz=1", "grpo.zzz: unknown field\n"),
    ],
)  # fmt: skip
def test_unknown_fields_answer_trl_and_verl_names(model_dir: Path, typed: str, answer: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.path={model_dir}", typed])
    assert answer in str(info.value) + "\n"


def test_every_foreign_name_points_at_a_field_that_exists() -> None:
    from r1_train.config import field_names
    from r1_train.names import FOREIGN_NAMES

    ours = set(field_names())
    assert {"grpo.beta", "cluster.trainer.ranks", "optim.adam_epsilon"} <= ours
    assert {target for target, _, _ in FOREIGN_NAMES.values()} <= ours


def test_print_config_shows_the_resolved_config(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    assert main(["run", f"model.path={model_dir}", "grpo.beta=0.01", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["grpo"]["beta"] == 0.01
    assert printed["rollout"]["group_size"] == 4  # a default, resolved
    assert printed["model"]["path"] == str(model_dir)
    assert (
        load_config(None, [f"model.path={model_dir}", "grpo.beta=0.01"]).model_dump(mode="json")
        == printed
    )  # what it prints is what a run would use


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.eval_every=2"], "run.eval_every (2) needs an eval section"),
        (
            ["run.eval_every=2", "eval={benchmark: tasks}", "run.mode=async"],
            "run.eval_every evaluates between synchronous steps",
        ),
        (["eval={benchmark: tasks, samples: 1, k: [2]}"], "raise eval.samples to 2"),
        (["trainer.test_freq=5"], "did you mean run.eval_every? (verl's trainer.test_freq"),
        (["eval_steps=5"], "did you mean run.eval_every? (TRL's eval_steps"),
    ],
)
def test_run_eval_every_is_checked_before_anything_starts(
    model_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.path={model_dir}", *overrides])
    assert message in str(info.value)


def test_held_out_tasks_default_to_the_next_seed(model_dir: Path) -> None:
    cfg = load_config(
        None, [f"model.path={model_dir}", "task.seed=7", "run.eval_every=1", "eval={}"]
    )
    assert cfg.held_out_task.seed == 8
    assert cfg.held_out_task.kind == cfg.task.kind
    chosen = load_config(
        None,
        [f"model.path={model_dir}", "eval_task={kind: countdown, size: 3}", "eval={}"],
    )
    assert chosen.held_out_task.kind == "countdown"
