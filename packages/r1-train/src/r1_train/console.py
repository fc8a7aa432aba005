"""What a user sees during a run: the step progress, the table and the plots' paths; not the
third-party log lines, which go to a file under the run directory.

Why at the file-descriptor level: vLLM's engine processes, Ray's core worker, Triton, torch's
warnings and transformers' loading bars each write to fd 1 or 2 from their own code, several
from child processes that Python logging never sees. :class:`QuietRun` points fds 1 and 2 at
``RUN_DIR/logs/r1-train.log`` for the run (children inherit that) and keeps the terminal for
what the run itself says, through :func:`progress_stream` and :attr:`QuietRun.out` /
:attr:`QuietRun.err`. ``--verbose`` leaves everything on the terminal, as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

LOG_FILE = Path("logs") / "r1-train.log"

_progress: TextIO | None = None  # the terminal while a quiet run holds fds 1 and 2


def progress_stream() -> TextIO:
    """Where progress bars go: the terminal, also while a quiet run captures stderr."""
    return _progress if _progress is not None else sys.stderr


class QuietRun:
    """Third-party output to ``log_path`` while inside; ``out``/``err`` still reach the
    terminal. With ``verbose`` nothing is redirected."""

    def __init__(self, log_path: Path, *, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> QuietRun:
        global _progress
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        _progress = self.err
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _progress
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        _progress = None
        self.out.close()
        self.err.close()
        self.out, self.err = sys.stdout, sys.stderr
