"""The driver's handle on the trainer ranks: it answers the calls the trainer makes on a
one-process :class:`~r1_train.policy.Policy` (update, engine weights, checkpoint), so the GRPO
loop is the same code on one machine and on a cluster.

The batch is split into contiguous shares (:meth:`r1_train.distributed.Rank.share`); each rank
gets its rows and the *whole* batch's sequence and token counts, which keeps the data-parallel
step equal to the one-process step (see :mod:`r1_train.distributed`). The statistics come back
per rank and are combined as the one-process update would have computed them.

A rank that dies takes the step with it: the others would wait in a collective until the
group's timeout, so they are stopped at once and :class:`TrainerRankLost` names the rank, its
node and what to resume from.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from r1_train.checkpoint import latest_checkpoint, next_step
from r1_train.distributed import Rank
from r1_train.nonfinite import NonFiniteError
from r1_train.policy import Batch
from r1_train.remote_trace import current_carrier


class TrainerRankLost(RuntimeError):
    """A trainer rank (or its node) died: which, where, during what, and where to resume."""

    def __init__(self, rank: int, place: dict[str, Any], phase: str, cause: BaseException,
                 run_dir: Path) -> None:  # fmt: skip
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            resume = "no checkpoint was written yet: a resumed run starts again from step 0"
        else:
            resume = (
                f"resume with run.resume=true from {ckpt} (next step {next_step(ckpt)}); "
                "cluster.trainer.ranks may differ from this run's"
            )
        super().__init__(
            f"trainer rank {rank} on node {place.get('node_id', '?')[:12]} "
            f"({place.get('ip', '?')}, pid {place.get('pid', '?')}) failed during {phase}: "
            f"{type(cause).__name__}: {_first_line(cause)}. The other ranks were stopped; {resume}"
        )
        self.rank, self.place, self.phase = rank, place, phase


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def share(batch: Batch, rows: slice) -> Batch:
    """The rows ``rows`` of ``batch`` (its per-row tensors cut the same way)."""

    def cut(t: Any) -> Any:
        return None if t is None else t[rows]

    return Batch(
        batch.input_ids[rows],
        batch.attention_mask[rows],
        batch.completion_ids[rows],
        batch.completion_mask[rows],
        batch.prompt_lens[rows],
        batch.advantages[rows],
        old_logp=cut(batch.old_logp),
        ref_logp=cut(batch.ref_logp),
        sampler_logp=cut(batch.sampler_logp),
    )


def combine_stats(parts: list[dict[str, Any]]) -> dict[str, float]:
    """The statistics the one-process update reports, from each rank's on its share.

    Losses are sums of per-row terms over global counts, so they add; per-token means are
    weighted by each share's tokens; extremes take the extreme; the gradient norm, learning
    rate and skip flags are global already (rank 0's)."""
    tokens = [p.pop("_tokens", 0.0) for p in parts]
    for p in parts:
        p.pop("_span", None)
    first = parts[0]
    total = sum(tokens) or 1.0
    out: dict[str, float] = dict(first)
    out["loss"] = sum(p["loss"] for p in parts)
    out["nonfinite_logprobs"] = sum(p.get("nonfinite_logprobs", 0.0) for p in parts)
    for key in ("kl", "clip_fraction", "mismatch/kl", "mismatch/off_fraction"):
        if all(key in p for p in parts):
            out[key] = sum(w * p[key] for w, p in zip(tokens, parts, strict=True)) / total
    for key, pick in (("ratio_max", max), ("mismatch/ratio_max", max), ("mismatch/ratio_min", min)):
        vals = [p[key] for p in parts if key in p]
        if vals:
            out[key] = pick(vals)
    return out


class RankGroup:
    """The trainer ranks of a run, seen from the driver as one policy."""

    def __init__(
        self,
        ranks: list[Any],
        places: list[dict[str, Any]],
        *,
        dtype: Any,
        model_path: Path,
        run_dir: Path,
    ) -> None:
        self.ranks, self.places, self.dtype = ranks, places, dtype
        self.model_path, self.run_dir = Path(model_path), Path(run_dir)
        self.world = len(ranks)
        self.spans: list[dict[str, Any]] = []  # the ranks' span ids of the last update/gather
        self.last_fingerprint: float | None = None  # of the weights last sent to the engines
        self._saved: dict[str, Any] | None = None

    # what Trainer calls on a Policy -------------------------------------------------------

    def fill_old_and_ref(self, batch: Batch) -> None:
        """Nothing here: each rank fills its own share's behaviour and reference log-probs."""

    def update(self, batch: Batch, max_completion_length: int) -> dict[str, float]:
        n = batch.input_ids.shape[0]
        tokens = float(batch.completion_mask.sum())
        carrier = current_carrier()
        calls = []
        for r, actor in enumerate(self.ranks):
            part = share(batch, Rank(r, self.world).share(n))
            calls.append(
                actor.update.remote(
                    part,
                    num_sequences=n,
                    num_tokens=tokens,
                    max_completion_length=max_completion_length,
                    carrier=carrier,
                )
            )
        parts = self._gather(calls, "the update")
        self.spans = [dict(p["_span"]) for p in parts]
        return combine_stats(parts)

    def engine_state(self) -> Any:
        """A Ray object ref to the whole weights (rank 0's gather): the engines pull it from
        the object store on their own nodes; the driver never holds the weights."""
        carrier = current_carrier()
        refs = [a.engine_state.options(num_returns=2).remote(carrier) for a in self.ranks]
        states = [ref for ref, _ in refs]
        spans = self._gather([span for _, span in refs], "the weight gather")
        self._gather(states[1:], "the weight gather")  # the others' Nones: the gather is done
        self.spans = spans
        self.last_fingerprint = float(spans[0]["fingerprint"])
        return states[0]

    def save(self, folder: Path) -> None:
        """Write the whole weights as a loadable HF checkpoint in ``folder`` (called by
        :func:`~r1_train.checkpoint.save_checkpoint`, which then asks for :meth:`trainer_state`)."""
        from safetensors.torch import save_file

        payload = self._gather([a.checkpoint.remote() for a in self.ranks], "the checkpoint")[0]
        self._saved = payload["trainer_state"]
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (self.model_path / name).is_file():
                shutil.copyfile(self.model_path / name, folder / name)
        weights = {k: v.contiguous() for k, v in payload["weights"].items()}
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def trainer_state(self) -> dict[str, Any]:
        if self._saved is None:
            raise RuntimeError("trainer_state() comes after save(): the ranks gather both at once")
        state, self._saved = self._saved, None
        return state

    # the cluster side ---------------------------------------------------------------------

    def _gather(self, refs: list[Any], phase: str) -> list[Any]:
        """Every call's answer, in order; the first failure stops every rank and is raised."""
        import ray

        if not refs:
            return []
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as exc:
                self.stop()
                failed = index[done[0]] if len(refs) == self.world else 0
                cause = getattr(exc, "cause", None)
                if isinstance(cause, NonFiniteError):  # a verdict on the data, not a crash
                    raise cause from None
                raise TrainerRankLost(
                    failed, self.places[failed], phase, exc, self.run_dir
                ) from exc
        return list(ray.get(refs))

    def stop(self) -> None:
        """Kill every rank now (a rank left in a collective would wait for the dead one)."""
        import ray

        for actor in self.ranks:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # a dead rank: nothing to close in it
            ray.get([a.close.remote() for a in self.ranks], timeout=30)
        self.stop()

    def describe(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.places]

    def write_layout(self, path: Path, engines: list[dict[str, Any]]) -> None:
        path.write_text(json.dumps({"trainer": self.describe(), "rollout": engines}, indent=2))
