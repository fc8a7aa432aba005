"""Config trees of the commands beside ``run`` (``eval``, ``sft``), read as ``run`` reads its own.

Why not ``TrainConfig``: it validates what only GRPO needs (group sizes, rewards, the agent).
These commands take the sections they share with it (``model``, ``rollout``, ``task``,
``optim``, ``run``: the same classes, so the same fields and rules) plus their own. A training
YAML can be passed as it is: the sections a command has no use for are dropped; overrides and
the command's own sections are still checked strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from r1_train.config import ConfigError, apply_override, read_config_file

M = TypeVar("M", bound=BaseModel)


def load_subconfig(
    model: type[M], path: Path | None, overrides: Sequence[str] = (), *, command: str
) -> M:
    """``model`` from YAML (sections it does not have are dropped) and ``a.b=value``
    overrides (parsed as YAML; unknown ones refused), with every bad field listed."""
    tree = {k: v for k, v in read_config_file(path).items() if k in model.model_fields}
    for item in overrides:
        apply_override(tree, item)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or '(top)'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        ]
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {command} config{where}:\n" + "\n".join(lines)) from None


def section_defaults(tree: Any, defaults: dict[tuple[str, str], Any]) -> Any:
    """``tree`` with ``{(section, field): value}`` filled in where the file and overrides left
    them out: a command's own defaults for shared sections (``sft``'s lr, its ``run.out_dir``)."""
    if not isinstance(tree, dict):
        return tree
    for (section, key), value in defaults.items():
        part = tree.get(section)
        if part is None:
            tree = {**tree, section: {key: value}}
        elif isinstance(part, dict) and key not in part:
            tree = {**tree, section: {**part, key: value}}
    return tree
