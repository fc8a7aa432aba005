"""reward-serve's Ray Serve application builder (`tangram_reward.serve_builder:app`), deployed
by the venv's own `serve run`: from a Serve config file, and from an import path with
key=value args, onto a real local Ray; then scored through handles and the TRL plug-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tangram_reward.serve_builder import deployment_from_args

SERVE = str(Path(sys.executable).with_name("serve"))
GOOD = "<think>2 and 2</think><answer>4</answer>"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"kind": "scalar_rm", "model_path": "/nowhere/rm"}, "reward model path '/nowhere/rm'"),
        ({"kind": "rules", "colour": "red"}, "reward deployment 'rules': colour: Extra inputs"),
        ({"kind": "rules", "max_batch_size": "lots"}, "max_batch_size: Input should be"),
        ({"kind": "judge", "model_path": "/x", "judge": "{"}, "judge: not valid JSON"),
        ({"deployments": [{"kind": "rules"}]}, "give each deployment its own application"),
    ],
)
def test_bad_args_name_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        deployment_from_args(args)


def test_command_line_strings_become_the_config(tiny_model_dir):
    cfg = deployment_from_args(
        {
            "kind": "judge",
            "model_path": str(tiny_model_dir),
            "max_batch_size": "4",
            "num_cpus": "0.5",
            "judge": '{"score_min": 0, "score_max": 9}',
            "env": '{"OTEL_TRACES_EXPORTER": "console"}',
        }
    )
    assert (cfg.name, cfg.max_batch_size, cfg.num_cpus) == ("judge", 4, 0.5)
    assert cfg.judge is not None
    assert cfg.judge.score_max == 9
    assert cfg.env == {"OTEL_TRACES_EXPORTER": "console"}


@pytest.fixture(scope="module")
def own_ray() -> Any:
    """A Ray of this test's own (``address="local"``): on a shared machine, a plain
    ``ray.init()`` would join whichever cluster another user started last. An already
    initialised Ray (the session's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def serve_run(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVE, "run", "--address", address, "--non-blocking", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_running(names: list[str], timeout_s: float = 240) -> None:
    """`serve run` of a config file returns once the controller has the config; the
    applications build and start after it."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: (apps[n].status, apps[n].message) if n in apps else None for n in names}
        failed = {n: s for n, s in states.items() if s and s[0] == "DEPLOY_FAILED"}
        assert not failed, failed
        if all(s and s[0] == "RUNNING" for s in states.values()):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


@pytest.mark.slow
def test_serve_run_deploys_from_a_config_file_and_an_import_path(
    own_ray: Any, tmp_path, tiny_rm_dir
):
    from ray import serve

    from tangram_reward.trl import TangramReward, TrlRewardConfig

    address = own_ray.get_runtime_context().gcs_address
    config = {
        "proxy_location": "Disabled",
        "applications": [
            {
                "name": "b-rules",
                "route_prefix": "/b-rules",
                "import_path": "tangram_reward.serve_builder:app",
                "args": {"kind": "rules", "num_cpus": 0.25, "max_batch_size": 4},
            },
            {
                "name": "b-rm",
                "route_prefix": "/b-rm",
                "import_path": "tangram_reward.serve_builder:app",
                "args": {"kind": "scalar_rm", "model_path": str(tiny_rm_dir), "num_cpus": 0.25},
            },
        ],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    try:
        out = serve_run(address, str(path))
        assert out.returncode == 0, out.stderr[-3000:]
        wait_running(["b-rules", "b-rm"])
        rules = serve.get_app_handle("b-rules")
        answer = rules.score.remote({"response": GOOD, "reference": "4"}).result(timeout_s=120)
        assert answer["reward"] == 1.0
        assert answer["meta"]["deployment"] == "rules"  # name defaulted to the kind

        # the import-path form, key=value strings on the command line
        out = serve_run(
            address,
            "tangram_reward.serve_builder:app",
            "--name",
            "b-cli",
            "kind=rules",
            "name=cli-rules",
            "num_cpus=0.25",
            "max_batch_size=2",
        )
        assert out.returncode == 0, out.stderr[-3000:]
        handle = serve.get_app_handle("b-cli")
        assert handle.score.remote({"response": GOOD, "reference": "5"}).result()["reward"] == 0.0

        # a bad argument fails in the builder, naming the path, and deploys nothing
        out = serve_run(
            address,
            "tangram_reward.serve_builder:app",
            "--name",
            "b-bad",
            "kind=scalar_rm",
            "model_path=/nowhere/rm",
        )
        assert out.returncode != 0
        assert "reward model path '/nowhere/rm' does not exist" in out.stdout + out.stderr
        assert "b-bad" not in serve.status().applications

        # the TRL plug-in scores on the deployed applications, through tangram actions
        trl_config = TrlRewardConfig(
            weights={"math": 1.0, "rm": 0.5},
            rules_app="b-rules",
            rules_deployment="rules",
            rm_app="b-rm",
            rm_deployment="scalar_rm",
        )
        with TangramReward(trl_config) as reward:
            out_rewards = reward(["2+2?", "2+2?"], [GOOD, "5"], answer=["4", "4"])
        rm = serve.get_app_handle("b-rm")
        rm_scores = [rm.score.remote("2+2?", text).result() for text in (GOOD, "5")]
        expected = [1.0 + 0.5 * rm_scores[0], 0.0 + 0.5 * rm_scores[1]]
        assert out_rewards == pytest.approx(expected, abs=1e-5)
    finally:
        for name in ("b-rules", "b-rm", "b-cli", "b-bad"):
            serve.delete(name)
