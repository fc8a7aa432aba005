"""Sandbox actions: the one place that builds them and reads their results.

Why: a training loop's tool call, a code reward and an evaluation all run programs in the
sandbox as tangram-core actions. Each used to spell the kind strings, payload keys and output
keys out by hand, so a change of the sandbox's request or result had to be found and made in
three packages. Here the payload is a :class:`~tangram_sandbox.models.RunRequest` or
:class:`~tangram_sandbox.models.RunTestsRequest` (validated where it is built, not when a
worker first reads it), and a result is read back as a :class:`~tangram_sandbox.models.RunResult`
or :class:`~tangram_sandbox.models.RunTestsResult` (``from_action``).

This module imports only pydantic and tangram-core, so that a package whose sandbox is an
optional extra (r1-train, reward-serve) can import it where it builds a sandbox action.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tangram_core.actions import Action, InvalidPayload
from tangram_core.elasticity import Amdahl, Elasticity
from tangram_sandbox.models import RunRequest, RunTestsRequest

__all__ = [
    "KINDS",
    "KIND_RUN",
    "KIND_RUN_TESTS",
    "TESTS_PARALLEL_FRACTION",
    "request_of",
    "run_action",
    "run_tests_action",
]

#: One program, its output back (a tool call, a HumanEval sample).
KIND_RUN = "sandbox.run"
#: One program against test cases, a verdict per test (a code reward).
KIND_RUN_TESTS = "sandbox.run_tests"
KINDS = frozenset({KIND_RUN, KIND_RUN_TESTS})
#: Spread over several workers, each share compiles the program again: the 10% serial part.
TESTS_PARALLEL_FRACTION = 0.9


def run_action(request: RunRequest, **fields: Any) -> Action:
    """A ``sandbox.run`` action for ``request`` on one worker (one ``cpu`` unit); ``fields`` are
    the action's own (``trajectory_id``, ``step_id``, ``priority``, ``deadline_s``...)."""
    fields.setdefault("demand", {"cpu": 1})
    return Action(kind=KIND_RUN, payload=_payload(request), **fields)


def run_tests_action(request: RunTestsRequest, *, max_units: int = 1, **fields: Any) -> Action:
    """A ``sandbox.run_tests`` action for ``request``.

    ``max_units`` > 1 makes it elastic: given spare workers, the scheduler may start it on up to
    that many (never more than there are tests), and the pool spreads the tests over them."""
    if max_units < 1:
        raise ValueError(f"run_tests_action(max_units={max_units}): need at least one unit")
    fields.setdefault("demand", {"cpu": 1})
    fields.setdefault(
        "elasticity",
        Elasticity(
            max_units=max(1, min(max_units, len(request.tests))),
            speedup=Amdahl(parallel_fraction=TESTS_PARALLEL_FRACTION),
        ),
    )
    return Action(kind=KIND_RUN_TESTS, payload=_payload(request), **fields)


def _payload(request: RunRequest | RunTestsRequest) -> dict[str, Any]:
    # only what the caller set: the manager's validation fills the defaults again, and a
    # payload that crosses Ray or HTTP stays as small as what was asked
    return request.model_dump(mode="json", exclude_unset=True)


def request_of(action: Action) -> RunRequest | RunTestsRequest:
    """The request an action carries, validated; :class:`InvalidPayload` names every bad field
    (the caller's fault: the orchestrator does not retry it)."""
    model: type[RunRequest] | type[RunTestsRequest] = (
        RunTestsRequest if action.kind == KIND_RUN_TESTS else RunRequest
    )
    if action.kind not in KINDS:
        raise InvalidPayload(
            f"action {action.id!r}: kind {action.kind!r} is not a sandbox action; "
            f"use one of {sorted(KINDS)}"
        )
    try:
        return model.model_validate(action.payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidPayload(f"action {action.id!r} ({action.kind}): {problems}") from None
