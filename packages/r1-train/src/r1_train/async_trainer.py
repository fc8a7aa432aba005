"""Asynchronous GRPO: the engine generates ahead of the trainer, within a staleness bound.

Why: in the synchronous loop the slowest trajectory holds the whole step. The engine decodes a
batch of one while the others wait, and the sandbox and the reward models sit idle during the
update. Here every group (``group_size`` samples of one prompt) is its own task: it generates,
calls its tools and scores its rewards through tangram-core as soon as it can, and the trainer
takes finished groups as they come. New weights reach the engine between two decode steps
(:class:`r1_train.streaming.StreamingEngine`); nobody waits for a drain.

The staleness bound. A step that trains policy version ``v`` (into ``v + 1``) may use a token
only if the policy that sampled it is at least ``v - max_staleness``. Two rules keep it:

* groups of step ``s`` are launched only once the policy is at version ``s - max_staleness``,
  so the engine runs at most ``max_staleness`` steps ahead;
* when the trainer takes groups, one whose oldest trained token is too old is dropped and
  generated again (``stale_dropped``), never trained on.

With ``max_staleness = 0`` the schedule is the synchronous one: the same groups, the same seeds,
the same batches. The sampler's log-probs travel with every token, and the loss reweights the
surrogate by ``pi_trainer / pi_sampler`` (``grpo.is_correction``); the mismatch is logged.

Tracing: one ``tangram.train.run`` span holds the run, so rollouts, actions and updates share a
timeline; each rollout and step span carries its policy version.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from r1_train.agent_loop import Trajectory, rollout_group
from r1_train.rewards import score_all
from r1_train.step import StepResult, select_for_training, tasks_for_step
from r1_train.streaming import RolloutDropped
from tangram_core import semconv as sc

if TYPE_CHECKING:
    from r1_train.trainer import Trainer

_tracer = trace.get_tracer("r1_train")


@dataclass
class ReadyGroup:
    """A finished, scored group waiting for the trainer."""

    step: int  # the step whose prompts it came from
    slot: int  # the prompt's place in that step
    trajs: list[Trajectory]
    launched_version: int

    @property
    def oldest_version(self) -> int:
        found = [v for t in self.trajs if (v := t.oldest_version) is not None]
        return min(found) if found else self.launched_version


class RolloutsLost(RuntimeError):
    """A rollout failed for a reason that retrying it here cannot fix (the engine died).

    The run stops and says what was not trained on, so that no sample is lost silently: the
    groups that failed, the finished groups still waiting, and how many groups were in flight.
    ``failed`` holds ``(step, prompt)`` pairs: a failed group is no longer in flight, so without
    it a run whose every group died at once would report nothing lost."""

    def __init__(
        self,
        cause: BaseException,
        ready: list[ReadyGroup],
        in_flight: int,
        failed: list[tuple[int, int]] | None = None,
    ) -> None:
        failed = sorted(failed or [])

        def named(groups: list[tuple[int, int]]) -> str:
            return ", ".join(f"step {s} prompt {p}" for s, p in groups) or "none"

        waiting = named([(g.step, g.slot) for g in ready])
        super().__init__(
            f"a rollout failed: {cause!r}. Not trained on: these failed groups: {named(failed)}; "
            f"{in_flight} group(s) in flight; and these finished groups: {waiting}. Checkpoints "
            "up to the last finished step are kept; resume with run.resume=true"
        )
        self.cause, self.ready, self.in_flight = cause, list(ready), in_flight
        self.failed = failed


def pick_groups(
    ready: list[ReadyGroup], need: int, version: int, max_staleness: int
) -> tuple[list[ReadyGroup], list[ReadyGroup]]:
    """The ``need`` groups to train version ``version`` on, and the groups too stale to keep.

    Oldest prompts first (by step, then slot), so a slow group is not overtaken for ever. Returns
    ``([], stale)`` while fewer than ``need`` usable groups are ready."""
    floor = version - max_staleness
    stale = [g for g in ready if g.oldest_version < floor]
    usable = sorted((g for g in ready if g.oldest_version >= floor), key=lambda g: (g.step, g.slot))
    return (usable[:need] if len(usable) >= need else []), stale


class AsyncRun:
    """One asynchronous training run over a :class:`~r1_train.trainer.Trainer`'s parts."""

    def __init__(self, trainer: Trainer, orch: Any) -> None:
        cfg = trainer.cfg
        self.trainer, self.orch, self.cfg = trainer, orch, cfg
        self.k = cfg.asynchronous.max_staleness
        # the in-process engine driven between decode steps, or the cluster's engines
        self.stream = trainer.streaming_engine()
        self._ready: list[ReadyGroup] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        # (step, slot) of each group that failed -> why; the first failure is the run's cause
        self._failures: dict[tuple[int, int], BaseException] = {}
        self._clock: dict[str, float] = {}
        self.stale_dropped = 0
        self.max_staleness_seen = 0

    async def run(self) -> list[StepResult]:
        from tqdm import tqdm

        from r1_train.console import progress_stream

        tr = self.trainer
        results: list[StepResult] = []
        bar = tqdm(
            total=self.cfg.run.steps,
            initial=tr.start_step,
            desc="GRPO async",
            unit="step",
            disable=not self.cfg.run.progress,
            file=progress_stream(),
        )
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_RUN, attributes={"tangram.train.mode": "async"}
        ):
            launcher = asyncio.ensure_future(self._launch_all())
            try:
                for step in range(tr.start_step, self.cfg.run.steps):
                    res = await self._train_step(step)
                    results.append(res)
                    m = res.metrics
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{m['reward_mean']:.3f}" if m["reward_mean"] is not None else "n/a",
                        stale=m["staleness_max"],
                    )
                    tr.save_if_due(step)
            finally:
                bar.close()
                launcher.cancel()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(launcher, *self._tasks, return_exceptions=True)
                self.stream.stop()
        return results

    # ---- producing groups -----------------------------------------------------------------

    async def _launch_all(self) -> None:
        tr = self.trainer
        for step in range(tr.start_step, self.cfg.run.steps):
            floor = step - self.k  # the engine may run at most k steps ahead
            async with self._changed:
                while tr.version < floor:
                    await self._changed.wait()
            for slot, task in enumerate(tasks_for_step(tr.tasks, self.cfg, step)):
                self._launch(step, slot, task)

    def _launch(self, step: int, slot: int, task: Any) -> None:
        t = asyncio.ensure_future(self._group(step, slot, task))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _group(self, step: int, slot: int, task: Any) -> None:
        tr, cfg = self.trainer, self.cfg
        launched = self.stream.version
        try:
            with _tracer.start_as_current_span(
                sc.SPAN_ROLLOUT,
                attributes={sc.STEP_ID: step, sc.POLICY_VERSION: launched, "tangram.slot": slot},
            ):
                trajs = await rollout_group(
                    self.stream,
                    self.orch,
                    tr.tokenizer,
                    task,
                    tr.prompt_text(task),
                    slot=slot,
                    rollout_cfg=cfg.rollout,
                    agent=cfg.agent,
                    step=step,
                    seed=cfg.run.seed,
                    clock=self._clock,
                    retry=RolloutDropped,
                )
                with _tracer.start_as_current_span(
                    sc.SPAN_TRAIN_REWARDS, attributes={sc.STEP_ID: step}
                ):
                    await score_all(self.orch, trajs, cfg.rewards, step)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the trainer must hear of it, not wait for ever
            self._failures.setdefault((step, slot), exc)
            async with self._changed:
                self._changed.notify_all()
            return
        async with self._changed:
            self._ready.append(ReadyGroup(step, slot, trajs, launched))
            self._changed.notify_all()

    # ---- consuming groups -----------------------------------------------------------------

    async def _take(self, step: int) -> list[ReadyGroup]:
        tr, need = self.trainer, self.cfg.run.prompts_per_step
        async with self._changed:
            while True:
                if self._failures:
                    raise self._lost(next(iter(self._failures.values())))
                chosen, stale = pick_groups(self._ready, need, tr.version, self.k)
                for g in stale:  # never trained on: generated again from its prompt
                    self._ready.remove(g)
                    self.stale_dropped += 1
                    self._launch(g.step, g.slot, g.trajs[0].task)
                if chosen:
                    for g in chosen:
                        self._ready.remove(g)
                    return chosen
                await self._changed.wait()

    async def _publish(self, state: dict[str, Any], version: int) -> float:
        """New weights into the streaming engine; an engine that died says what is untrained."""
        try:
            return await self.stream.update_weights(state, version)
        except Exception as exc:
            raise self._lost(exc) from exc

    def _lost(self, cause: BaseException) -> RolloutsLost:
        return RolloutsLost(cause, self._ready, len(self._tasks), list(self._failures))

    async def _train_step(self, step: int) -> StepResult:
        tr, stream = self.trainer, self.stream
        t_step = time.perf_counter()
        busy0 = stream.busy_s
        clock: dict[str, float] = {}
        t0 = time.perf_counter()
        groups = await self._take(step)
        clock["wait"] = time.perf_counter() - t0
        staleness = [tr.version - g.oldest_version for g in groups]
        self.max_staleness_seen = max(self.max_staleness_seen, *staleness)
        trajs = [t for g in groups for t in g.trajs]
        with _tracer.start_as_current_span(
            sc.SPAN_TRAIN_STEP,
            attributes={
                sc.STEP_ID: step,
                sc.POLICY_VERSION: tr.version,
                sc.POLICY_STALENESS: max(staleness),
            },
        ) as step_span:
            kept, info = select_for_training(trajs, self.cfg)
            update: dict[str, float] = {}
            if kept:
                update = await tr.update_and_publish(kept, step, clock, self._publish)
                async with self._changed:
                    tr.version += 1
                    self._changed.notify_all()
            clock["step"] = time.perf_counter() - t_step
            clock["generation"] = stream.busy_s - busy0
            row = tr.metrics_row(trajs, info, update, clock)
            row.update(
                {
                    "staleness_max": max(staleness),
                    "staleness_mean": statistics.fmean(staleness),
                    "stale_dropped": self.stale_dropped,
                    "rollouts_dropped": stream.dropped,
                    "engine_idle": max(0.0, 1.0 - clock["generation"] / clock["step"]),
                    "samples_per_s": len(trajs) / clock["step"],
                }
            )
            step_span.set_attribute(
                sc.REWARD, row["reward_mean"] if row["reward_mean"] is not None else 0.0
            )
        tr.metrics.write(step, row)
        tr.log_samples(step, trajs)
        return StepResult(step, row, trajs)
