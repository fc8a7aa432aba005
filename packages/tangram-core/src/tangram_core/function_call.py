"""The function-call payload: an action that names a Python function by import path.

Why its own module: two pools run such actions, local worker processes
(:mod:`tangram_core.process_pool`) and Ray actors (:mod:`tangram_core.ray.pool`); both
validate the payload, check it against an allow-list and import the function the same way,
so neither borrows the other's internals.

    Action(kind="process.call", payload={"fn": "module:function", "args": [...], "kwargs": {...}})
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tangram_core.actions import Action, InvalidPayload

__all__ = ["FunctionCall", "function_action", "parse_function_call", "resolve_function"]


class FunctionCall(BaseModel):
    """The payload of an action this pool runs: a function by import path, and its arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fn: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'module:function', e.g. 'tangram_core.process_pool:sleep_task'.",
    )
    args: list[Any] = Field(default_factory=list, description="Positional arguments.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")


def parse_function_call(
    action: Action, pool: str, allowed_functions: Sequence[str]
) -> FunctionCall:
    """Validate an action's payload as a :class:`FunctionCall` the pool may run; shared by every
    pool that runs functions (local processes, Ray actors)."""
    try:
        call = FunctionCall.model_validate(action.payload)
    except ValidationError as exc:
        raise InvalidPayload(
            f"action {action.id!r} ({action.kind}): pool {pool!r} needs "
            f"payload={{'fn': 'module:function', 'args': [...], 'kwargs': {{...}}}}; "
            f"{exc.error_count()} problem(s): "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    if not any(fnmatch.fnmatchcase(call.fn, p) for p in allowed_functions):
        raise InvalidPayload(
            f"action {action.id!r} ({action.kind}): function {call.fn!r} is not allowed in "
            f"pool {pool!r}; allowed_functions={list(allowed_functions)}"
        )
    return call


def function_action(
    fn: str,
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    kind: str = "process.call",
    **fields: Any,
) -> Action:
    """An :class:`Action` that runs ``fn`` (``'module:function'``) on a function pool;
    ``fields`` are the action's own (``id``, ``trajectory_id``, ``elasticity``...)."""
    call = FunctionCall(fn=fn, args=list(args), kwargs=kwargs or {})
    return Action(kind=kind, payload=call.model_dump(), **fields)


def resolve_function(
    fn_path: str, cache: dict[str, tuple[Callable[..., Any], bool]]
) -> tuple[Callable[..., Any], bool]:
    """Import ``module:qualname`` once per worker; also say whether it takes ``units``."""
    if fn_path not in cache:
        module_name, _, qualname = fn_path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{fn_path} is a {type(obj).__name__}, not a function")
        try:
            wants_units = "units" in inspect.signature(obj).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            wants_units = False
        cache[fn_path] = (obj, wants_units)
    return cache[fn_path]
