#!/usr/bin/env python3
"""Build the offline model fixtures that tests and the demo use, idempotently.

    python tools/models/build_models.py all            # every model
    python tools/models/build_models.py tiny --print-path

Models land in ``$TANGRAM_MODELS_DIR`` (default ``<repo>/.cache/models``, not in git). A model
is rebuilt only when its builder's source changes: each checkpoint records the hash of the code
that made it. Builds write to a temporary folder and rename it into place, under a file lock,
so an interrupted or concurrent build never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STAMP = ".builder-hash"

# name -> (folder, builder module)
MODELS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny-llama", "tiny_llama"),
    "smollm2": ("smollm2-135m-instruct", "smollm2"),
    "tiny-rm": ("tiny-rm", "tiny_rm"),
    "tiny-hysparse": ("tiny-hysparse", "tiny_hysparse"),
}


def models_dir() -> Path:
    return Path(os.environ.get("TANGRAM_MODELS_DIR", ROOT / ".cache" / "models")).resolve()


# A builder that imports another one is stale when either changes.
_DEPENDS = {"tiny_rm": ["tiny_llama"], "tiny_hysparse": ["tiny_llama"]}


def _builder_hash(module: str) -> str:
    h = hashlib.sha256()
    for name in [module, *_DEPENDS.get(module, [])]:
        h.update((HERE / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_current(path: Path, module: str) -> bool:
    stamp = path / STAMP
    return stamp.exists() and stamp.read_text().strip() == _builder_hash(module)


def ensure(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Return the path of model ``name``, building it first if missing or stale."""
    folder, module = MODELS[name]
    cache = models_dir()
    path = cache / folder
    if not force and _is_current(path, module):
        return path
    with _locked(cache):
        if not force and _is_current(path, module):  # built by a concurrent caller
            return path
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        sys.path.insert(0, str(HERE))
        builder = __import__(module)
        tmp = cache / f".{folder}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"[models] building {name} -> {path}")
        t0 = time.monotonic()
        if name == "smollm2":
            builder.build(tmp, downloads=cache / "downloads")
        else:
            builder.build(tmp)
        (tmp / STAMP).write_text(_builder_hash(module))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        log(f"[models] {name} built in {time.monotonic() - t0:.1f}s")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build Tangram's offline model fixtures.")
    parser.add_argument("which", choices=[*MODELS, "all"])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--print-path", action="store_true", help="print only the model path (for scripts)"
    )
    args = parser.parse_args(argv)
    names = list(MODELS) if args.which == "all" else [args.which]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.print_path else sys.stdout, flush=True)

    for name in names:
        path = ensure(name, force=args.force, log=log)
        print(path if args.print_path else f"[models] {name}: {path}", flush=True)


if __name__ == "__main__":
    main()
