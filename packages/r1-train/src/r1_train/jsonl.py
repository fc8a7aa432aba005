"""Reading a user's JSONL file row by row, with errors that name the file and the row.

Why one module: task files, HumanEval completions, SFT chats and distillation rows are all
user data; each loader validates its own schema, and all of them say where a bad row is the same
way (``FILE: row N: what is wrong``) instead of each parsing lines and wording errors again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def json_rows(path: Path, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """``(row number, parsed value)`` of each non-blank line of ``path`` (rows count from 1);
    a line that is not JSON raises ``error`` naming the file and the row."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: row {n}: not valid JSON ({exc.msg})") from None
        yield n, row


def field_errors(exc: ValidationError) -> str:
    """Every failed field of a row and its rule, ``field: rule; ...`` (``row`` for the row
    itself), without pydantic's "Value error, " prefix or documentation URL."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
