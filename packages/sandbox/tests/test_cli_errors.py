"""`tangram-sandbox` as a user runs it: bad arguments and missing extras exit 2 with a message
naming the argument or the extra, and `run`/`serve` export spans under the OTEL_* variables."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tangram_core.http.guard import auth_headers
from tangram_sandbox.cli import main

TOKEN = "sandbox-cli-token-0123456789abcdef"


def cli(
    *args: str, blocked: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter; ``blocked`` modules import as if not installed
    (``sys.modules[name] = None`` makes every import of them raise ImportError)."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None\n"
        "from tangram_sandbox.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("blocked", [("uvicorn",), ("fastapi",)])
def test_serve_without_the_server_extra_names_it(blocked):
    out = cli("serve", "--port", "0", blocked=blocked)
    assert out.returncode == 2
    assert "pip install 'tangram-sandbox[server]'" in out.stderr
    assert f"needs {blocked[0]}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--workers", "-1"], "argument --workers: must be >= 0, got -1"),
        (["serve", "--workers", "two"], "argument --workers: 'two' is not an integer"),
        (["serve", "--max-workers", "0"], "argument --max-workers: must be >= 1, got 0"),
        (["serve", "--max-in-flight", "0"], "argument --max-in-flight: must be >= 1, got 0"),
        (["serve", "--max-queue", "-5"], "argument --max-queue: must be >= 0, got -5"),
        (["serve", "--queue-timeout-s", "0"], "argument --queue-timeout-s: must be > 0, got 0"),
        (["serve", "--client-rate", "nan"], "argument --client-rate: must be > 0, got nan"),
        (["serve", "--port", "-2"], "argument --port: must be >= 0, got -2"),
    ],
)
def test_bad_serve_arguments_name_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_max_workers_below_workers_names_both(capsys, monkeypatch):
    monkeypatch.delenv("TANGRAM_API_TOKEN", raising=False)
    monkeypatch.delenv("TANGRAM_API_TOKEN_FILE", raising=False)
    assert main(["serve", "--workers", "3", "--max-workers", "2", "--port", "1"]) == 2
    assert "--max-workers (2) must be >= --workers (3)" in capsys.readouterr().err


def test_run_on_a_missing_file_or_a_folder_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read FILE '{missing}': No such file or directory" in err
    assert main(["run", str(tmp_path)]) == 2
    assert "Is a directory" in capsys.readouterr().err


def test_a_bad_otel_variable_is_named(tmp_path):
    program = tmp_path / "p.py"
    program.write_text("print(1)\n")
    out = cli("run", str(program), env={"OTEL_TRACES_EXPORTER": "carrier-pigeon"})
    assert out.returncode == 2
    assert "OTEL_TRACES_EXPORTER='carrier-pigeon'" in out.stderr
    assert "Traceback" not in out.stderr


def console_spans(stdout: str) -> list[dict]:
    """The JSON objects that OpenTelemetry's console exporter printed, among other output."""
    decoder = json.JSONDecoder()
    spans, i = [], stdout.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(stdout, i)
        except ValueError:
            i = stdout.find("{", i + 1)
            continue
        if isinstance(obj, dict) and "context" in obj:
            spans.append(obj)
        i = stdout.find("{", end)
    return spans


def test_run_prints_its_span_with_the_console_exporter(tmp_path, can_sandbox):
    program = tmp_path / "p.py"
    program.write_text("print(6 * 7)\n")
    out = cli("run", str(program), env={"OTEL_TRACES_EXPORTER": "console"})
    assert out.returncode == 0, out.stderr
    assert "42\n" in out.stdout
    spans = console_spans(out.stdout)
    assert [s["name"] for s in spans] == ["tangram.sandbox.run"]
    assert spans[0]["resource"]["attributes"]["service.name"] == "tangram-sandbox"
    assert spans[0]["attributes"]["tangram.sandbox.status"] == "ok"
    # and without the variable, no span is printed
    quiet = cli("run", str(program), env={"OTEL_TRACES_EXPORTER": "none"})
    assert quiet.stdout == "42\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_prints_a_span_per_request_and_serves_prometheus_metrics(tmp_path, can_sandbox):
    port, metrics_port = _free_port(), _free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGRAM_API_TOKEN")}
    env["OTEL_TRACES_EXPORTER"] = "console"
    env["OTEL_METRICS_EXPORTER"] = "prometheus"
    env["OTEL_EXPORTER_PROMETHEUS_HOST"] = "127.0.0.1"
    env["OTEL_EXPORTER_PROMETHEUS_PORT"] = str(metrics_port)
    argv = ["serve", "--port", str(port), "--workers", "1", "--token-file", str(token_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tangram_sandbox.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the CLI server did not come up"
            time.sleep(0.2)
        ok = httpx.post(
            url + "/run", json={"code": "print(1)"}, headers=auth_headers(TOKEN), timeout=30
        )
        assert ok.json()["stdout"] == "1\n"
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        runs = [
            line
            for line in scraped.splitlines()
            if line.startswith("tangram_sandbox_run_duration_seconds_count")
        ]
        assert len(runs) == 1, scraped[-3000:]
        assert 'tangram_sandbox_language="python"' in runs[0]
        assert 'tangram_sandbox_status="ok"' in runs[0]
        assert runs[0].endswith(" 1.0")
        assert "tangram_sandbox_workers{" in scraped
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    names = [s["name"] for s in console_spans(stdout)]
    assert "tangram.sandbox.run" in names, stdout[-2000:]
