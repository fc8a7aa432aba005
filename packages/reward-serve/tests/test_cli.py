"""`tangram-reward check` and `serve --once`, run as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tangram_reward.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("deployments: []", "deployments: List should have at least 1 item"),
        ("deployments:\n  - {name: a, kind: rules, colour: red}", "deployments[0] (a): colour"),
        (
            "deployments:\n  - {name: rm, kind: scalar_rm}",
            "deployments[0] (rm): Value error, deployment 'rm': kind 'scalar_rm' needs model_path",
        ),
        ("deployments:\n  - {name: a, kind: rules}\n  - {name: a, kind: rules}", "repeated: ['a']"),
        (
            "deployments:\n  - {name: j, kind: judge, model_path: /nowhere/judge}",
            "deployment 'j': judge model path '/nowhere/judge' does not exist",
        ),
        (
            "deployments:\n  - {name: j, kind: judge, model_path: /x, judge: {rubric: '{prompt}'}}",
            "deployments[0] (j): judge.rubric: Value error, rubric must contain ['response']",
        ),
        (
            "deployments:\n  - {name: r, kind: rules, judge: {}}",
            "deployment 'r': a 'judge' block needs kind 'judge', not 'rules'",
        ),
        ("deployments: [", "not valid YAML"),
        (
            "deployments:\n  - {name: rm, kind: scalar_rm, model_path: /nowhere/rm}",
            "deployments[0] (rm): Value error, deployment 'rm': reward model path '/nowhere/rm' "
            "does not exist",
        ),
    ],
)
def test_check_names_the_problem(tmp_path, yaml_text, message):
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml_text)
    out = cli("check", str(path))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_check_accepts_a_good_file(tmp_path, tiny_rm_dir, tiny_model_dir):
    path = tmp_path / "rewards.yaml"
    path.write_text(
        f"deployments:\n  - {{name: rules, kind: rules}}\n"
        f"  - {{name: rm, kind: scalar_rm, model_path: {tiny_rm_dir}}}\n"
        f"  - name: judge\n    kind: judge\n    model_path: {tiny_model_dir}\n"
        "    judge: {score_min: 0, score_max: 9, max_tokens: 1, score_token_only: true}\n"
    )
    out = cli("check", str(path))
    assert out.returncode == 0, out.stderr
    assert "3 deployment(s) OK" in out.stdout


def test_check_refuses_a_causal_lm_as_a_reward_model(tmp_path, tiny_model_dir):
    path = tmp_path / "rewards.yaml"
    path.write_text(
        f"deployments:\n  - {{name: rm, kind: scalar_rm, model_path: {tiny_model_dir}}}\n"
    )
    out = cli("check", str(path))
    assert out.returncode == 2
    assert "deployment 'rm'" in out.stderr
    assert "is not a sequence-classification checkpoint" in out.stderr


def cli_without(
    modules: list[str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as if ``modules`` were not installed (``sys.modules[name] = None`` makes
    every import of them raise ImportError, as a missing package does)."""
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    sys.modules[name] = None\n"
        "from tangram_reward.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_check_needs_no_ray(tmp_path, tiny_rm_dir):
    path = tmp_path / "rewards.yaml"
    path.write_text(
        f"deployments:\n  - {{name: rules, kind: rules}}\n"
        f"  - {{name: rm, kind: scalar_rm, model_path: {tiny_rm_dir}}}\n"
    )
    out = cli_without(["ray", "torch"], "check", str(path))
    assert out.returncode == 0, out.stderr
    assert "2 deployment(s) OK" in out.stdout


@pytest.mark.parametrize(
    ("blocked", "deployment", "extra"),
    [
        (["ray"], "{name: rules, kind: rules}", "[serve]"),
        (["torch"], "{name: rm, kind: scalar_rm, model_path: RM}", "[models]"),
    ],
)
def test_serve_without_its_extra_names_the_extra(tmp_path, tiny_rm_dir, blocked, deployment, extra):
    path, _ = rewards_file(tmp_path, deployment.replace("RM", str(tiny_rm_dir)))
    out = cli_without(blocked, "serve", str(path), "--once")
    assert out.returncode == 2, out.stderr
    assert f"pip install 'tangram-reward-serve{extra}'" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_a_missing_reward_model_before_starting_ray(tmp_path):
    path, _ = rewards_file(tmp_path, "{name: rm, kind: scalar_rm, model_path: /nowhere/rm}")
    out = cli("serve", str(path), "--once", timeout=60)
    assert out.returncode == 2
    assert "deployment 'rm': reward model path '/nowhere/rm' does not exist" in out.stderr
    assert "replicas" not in out.stdout  # no health table: nothing was deployed


def test_serve_sets_up_telemetry_from_the_otel_variables(tmp_path):
    # configure_telemetry runs before Ray starts: a bad exporter name is named, exit 2
    path, _ = rewards_file(tmp_path, "{name: rules, kind: rules}")
    bad = {"OTEL_TRACES_EXPORTER": "carrier-pigeon"}
    out = cli_without([], "serve", str(path), "--once", env=bad)
    assert out.returncode == 2
    assert "OTEL_TRACES_EXPORTER='carrier-pigeon'" in out.stderr
    assert "Traceback" not in out.stderr


def rewards_file(tmp_path, deployment: str, port: int | None = None):
    """A one-deployment rewards.yaml on ``port`` (default: a free one); its path and port."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    path = tmp_path / "rewards.yaml"
    path.write_text(f"http_port: {port}\ndeployments:\n  - {deployment}\n")
    return path, port


@pytest.mark.slow
def test_serve_once_starts_and_reports_health(tmp_path):
    path, port = rewards_file(tmp_path, "{name: rules, kind: rules, num_cpus: 0.25}")
    out = cli("serve", str(path), "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"http://127.0.0.1:{port}/rules" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("rules"))
    assert row.split()[2] == "1"  # one replica running
    assert 'gateway: 200 {"status": "ok", "deployments": ["rules"]}' in out.stdout


def test_serve_names_a_taken_port_before_starting_ray(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path, port = rewards_file(tmp_path, "{name: rules, kind: rules}", taken.getsockname()[1])
        out = cli("serve", str(path), timeout=60)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path):
    """A lone request waits 3 s for a batch partner; SIGTERM arrives meanwhile. The gateway
    stops accepting, answers that request with its reward, then the server exits 0."""
    path, port = rewards_file(
        tmp_path,
        "{name: slow, kind: rules, num_cpus: 0.25, max_batch_size: 2, batch_wait_timeout_s: 3.0}",
    )
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall the server
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tangram_reward.cli", "serve", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server never became healthy"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        box: dict[str, httpx.Response] = {}
        body = {"response": "<think>x</think><answer>4</answer>", "reference": "4"}
        request = threading.Thread(
            target=lambda: box.update(r=httpx.post(url + "/slow", json=body, timeout=60))
        )
        request.start()
        time.sleep(1.0)  # the request is waiting in its batch
        proc.send_signal(signal.SIGTERM)
        request.join(60)
        assert box["r"].status_code == 200
        assert box["r"].json()["reward"] == 1.0
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        assert "serving; Ctrl-C or SIGTERM to stop" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
