"""A discrete-event model of an RL training loop at cluster scale, synchronous or asynchronous.

Why: issue 11 asks what asynchronous rollouts buy at the scale of the published systems (AReaL,
ROLL, verl's fully-async trainer: 1.5x to 2.7x), which no test machine has. This model runs the
whole loop on a virtual clock: rollout engines with continuous batching, the external actions
a trajectory issues (tool calls, reward scoring) scheduled by the *real* tangram scheduler
object through :class:`~tangram_core.sim.engine.ActionRunner`, and a trainer that consumes GRPO
groups. It is pure and deterministic for a given config: no clock, no I/O, one seed.

The actors (every parameter is a field of :class:`~tangram_core.sim.rl_config.RLLoopConfig`):

* **Engines** decode in steps of ``a + b * active`` seconds, one token per active sequence per
  step, at most ``max_batch`` sequences at once. The batch changes only at step boundaries:
  a sequence that arrives (a new trajectory, or the next turn after a tool call) waits for the
  step in progress to end. Events happen only when the batch changes, so an engine with 256
  sequences costs a few events per turn, not one per token.
* **Trajectories** are sticky to the least-loaded engine they were dispatched to (prefix-cache
  affinity). Between turns they leave the engine and run a tool action on the shared CPU pool;
  at the end a reward action (GPU reward model or CPU rule verifier).
* **The trainer** takes the first ``groups_per_step`` complete groups, updates for ``U``
  seconds, then publishes version ``v + 1`` and spends ``S`` seconds on the sync. Each engine
  loads the new weights at its next step boundary and stalls ``S`` seconds doing so.

**Staleness.** Every sample records the policy version of each segment of tokens it generated
(a segment ends when its engine loads new weights). ``max_head_offpolicyness``-style admission
(AReaL; tinker's ``sampling_steps_ahead``) only bounds how far generation runs ahead: a long
trajectory can still outlive it. So at each publish of version ``v``, any sample whose oldest
token is older than ``v - max_staleness`` can never be trained and is restarted from its prompt
at once (its tokens are counted as wasted). Hence no trained token ever lags by more than
``max_staleness``; :attr:`RLLoopResult.max_staleness_seen` reports what did happen, and the
trainer refuses (``RuntimeError``) a sample that breaks the bound, which would be a bug here.

**Sync is a special case.** ``mode="sync"`` admits one batch per version: the next batch starts
only after the update and the weight sync, so the engines drain to the last (longest)
trajectory and idle through training. ``mode="async"`` with ``max_staleness=0`` therefore
gives exactly the sync timeline; a test checks it.

Not modelled: prefill cost (prompt and tool-output tokens are free), KV-cache capacity
(``max_batch`` stands for it), preemption, per-prompt correlation of lengths within a group, the
trainer's dependence on batch token count (``U`` is per batch), engine failures, cancelling the
external action of a restarted trajectory (it runs to completion and its result is dropped).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

from tangram_core.elastic_scheduler import ElasticScheduler
from tangram_core.scheduler import ActionSpec, Scheduler
from tangram_core.sim.engine import ActionRunner, SimAction, SimResult
from tangram_core.sim.rl_config import RLLoopConfig, RolloutWorkload
from tangram_core.sim.workloads import reward_action, summarize, tool_action

_ENGINE = 0  # an engine reaches a step boundary it must act on
_FINISH = 1  # an external action finished (if its version is still current)
_UPDATE_DONE = 2  # the trainer finished an update: publish the new version
_TRAINER_FREE = 3  # the trainer finished publishing: it may start the next update

_uids = itertools.count()


@dataclass(frozen=True, slots=True)
class TrainedSample:
    """One trajectory the trainer used: at which version, and which versions generated it."""

    trajectory: str
    used_at_version: int
    segments: tuple[tuple[int, int], ...]  # (policy version, tokens), in generation order

    @property
    def staleness(self) -> int:
        """Versions between the oldest token and the trainer that used it."""
        return self.used_at_version - min(v for v, _ in self.segments)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass(frozen=True, slots=True)
class RLLoopResult:
    """What one run measured. Engine fractions are over engine-time (engines x makespan)."""

    config: RLLoopConfig
    samples_trained: int
    makespan_s: float
    update_end_s: tuple[float, ...]
    samples_per_s: float  # steady state: updates after warmup_steps
    samples_per_s_overall: float
    engine_idle: float  # share of engine-time not decoding (no active sequence, or loading weights)
    engine_sync_stall: float  # share of engine-time spent loading weights
    batch_occupancy: float  # time-average of active sequences / max_batch, idle time included
    mean_batch_decoding: float  # average active sequences while decoding
    trainer_idle: float
    max_staleness_seen: int
    mean_staleness: float
    off_policy_token_share: float  # trained tokens generated by an older version than the trainer
    restarts: int  # samples restarted from their prompt (stale, or dropped at a weight update)
    tokens_trained: int
    tokens_wasted: int
    act: dict[str, dict[str, float]]  # ACT summaries: "all", "sandbox", "reward"
    actions: SimResult
    samples: tuple[TrainedSample, ...]

    @property
    def step_times(self) -> list[float]:
        ends = (0.0, *self.update_end_s)
        return [b - a for a, b in itertools.pairwise(ends)]

    def summary(self) -> dict[str, object]:
        """The scalar metrics, for printing and JSON."""
        return {
            "mode": self.config.mode,
            "max_staleness": self.config.max_staleness,
            "in_flight": self.config.in_flight,
            "samples_trained": self.samples_trained,
            "makespan_s": self.makespan_s,
            "samples_per_s": self.samples_per_s,
            "samples_per_s_overall": self.samples_per_s_overall,
            "step_time_mean_s": self.makespan_s / len(self.update_end_s),
            "engine_idle": self.engine_idle,
            "engine_sync_stall": self.engine_sync_stall,
            "batch_occupancy": self.batch_occupancy,
            "mean_batch_decoding": self.mean_batch_decoding,
            "trainer_idle": self.trainer_idle,
            "max_staleness_seen": self.max_staleness_seen,
            "mean_staleness": self.mean_staleness,
            "off_policy_token_share": self.off_policy_token_share,
            "restarts": self.restarts,
            "tokens_trained": self.tokens_trained,
            "tokens_wasted": self.tokens_wasted,
            "act": self.act,
        }


# -- actors ---------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Traj:
    """One attempt at one sample of a group; a restart makes a new attempt (a new object)."""

    uid: int
    name: str
    group: int
    slot: int
    attempt: int
    tokens: list[int]  # per turn
    tools: list[SimAction]  # one per turn but the last
    reward: SimAction
    engine: int = -1
    turn: int = 0
    alive: bool = True
    on_engine: bool = False
    gen_done: bool = False
    done: bool = False
    first_version: int = -1  # version of the oldest token; -1 until the first token
    join_counter: int = 0  # engine step counter when the open segment began
    seg_version: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Group:
    gid: int
    slots: list[_Traj]
    n_done: int = 0


@dataclass(slots=True, eq=False)
class _Engine:
    """A continuous-batching engine. ``counter`` counts its decode steps: a sequence that joined
    at counter c with n tokens to go finishes at counter c + n, whatever joins or leaves."""

    idx: int
    version: int = 0
    pending: int = 0  # newest published version (loaded at the next step boundary)
    active: dict[int, _Traj] = field(default_factory=dict)
    finish_heap: list[tuple[int, int, _Traj]] = field(default_factory=list)
    queue: deque[_Traj] = field(default_factory=deque)
    counter: int = 0
    seg_start: float = 0.0
    dt: float = 0.0
    stalled_until: float = -math.inf
    ev: int = 0  # version of the engine's one valid event
    next_at: float = math.inf
    load: int = 0  # live trajectories assigned here (also while in a tool call)
    dirty: bool = False  # an active trajectory was restarted: purge at the next boundary
    decode_s: float = 0.0
    seq_s: float = 0.0
    stall_s: float = 0.0


def draw_trajectory(
    w: RolloutWorkload, seed: int, group: int, slot: int, attempt: int
) -> tuple[list[int], list[SimAction], SimAction]:
    """Turn lengths, tool calls and the reward call of one attempt at one sample.

    Seeded by (seed, group, slot, attempt) alone, so sync and async runs see the same samples
    whatever order events happen in, and a restart samples a fresh response, as a real engine
    would (its length too: restarts shorten the tail, the known bias of dropping)."""
    # An integer seed (not a string) because seeding is on the hot path; fields overlap only
    # past 4096 samples per group or 256 attempts, where draws would merely correlate.
    rng = random.Random((seed << 48) ^ (group << 20) ^ (slot << 8) ^ attempt)
    name = f"g{group}s{slot}a{attempt}"
    mu = math.log(w.tokens_median)
    tokens, tools = [], []
    n_turns = rng.randint(w.min_turns, w.max_turns)
    for turn in range(n_turns):
        if w.tail_fraction and rng.random() < w.tail_fraction:
            n = w.tail_min_tokens * rng.paretovariate(w.tail_alpha)
        else:
            n = rng.lognormvariate(mu, w.tokens_sigma)
        tokens.append(max(1, min(round(n), w.max_tokens_per_turn)))
        if turn < n_turns - 1:
            tools.append(tool_action(rng, w.actions, f"{name}t{turn}", name))
    if w.reward == "model":
        models = w.actions.reward_models
        kind = models[rng.randrange(len(models))]
        reward = reward_action(rng, w.actions, f"{name}r", name, kind)
    else:
        spec = ActionSpec(f"{name}r", "reward.rule", (("cpu", 1.0),), trajectory_id=name)
        reward = SimAction(spec, w.rule_reward_s)
    return tokens, tools, reward


def admission_target(config: RLLoopConfig, version: int) -> int:
    """Groups that may have been started once the trainer has published ``version`` updates.

    Sync: one batch per version, so a batch starts only after the previous update and sync.
    Async: ``max_staleness + 1`` batches ahead (AReaL's bound on rollouts issued)."""
    ahead = config.max_staleness if config.mode == "async" else 0
    return (version + ahead + 1) * config.workload.groups_per_step


def must_restart(config: RLLoopConfig, tr: _Traj, version: int) -> bool:
    """At the publish of ``version``: can this sample no longer be trained as it is?"""
    if tr.first_version < 0:
        return False  # no token yet: it will start under the new weights
    if tr.first_version < version - config.max_staleness:
        return True  # the trainer will never again accept its oldest token
    return config.in_flight == "drop" and not tr.gen_done


# -- the loop -------------------------------------------------------------------------------------


class _Loop:
    """One run's state and event handlers; :func:`simulate_rl_loop` is the public entry."""

    def __init__(self, config: RLLoopConfig, scheduler: Scheduler) -> None:
        self.cfg = config
        self.w = config.workload
        self.heap: list[tuple[float, int, int, int | str, int]] = []
        self.seq = itertools.count()
        self.actions = SimResult(name=f"rl-{config.mode}", capacity=scheduler.capacity())
        self.runner = ActionRunner(scheduler, self.actions, self._push_finish)
        self.engines = [_Engine(i) for i in range(config.engines)]
        self.load_heap = [(0, i) for i in range(config.engines)]
        self.groups: dict[int, _Group] = {}  # admitted, not yet trained
        self.ready: dict[int, None] = {}  # complete groups, in completion order
        self.owner: dict[str, _Traj] = {}  # external action id -> trajectory
        self.admitted = 0
        self.version = 0
        self.trainer_busy = False
        self.update_end: list[float] = []
        self.samples: list[TrainedSample] = []
        self.restarts = 0
        self.tokens_wasted = 0

    # events
    def _push(self, t: float, kind: int, payload: int | str, version: int) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload, version))

    def _push_finish(self, t: float, action_id: str, version: int) -> None:
        self._push(t, _FINISH, action_id, version)

    def run(self) -> float:
        self._admit(0.0)
        heap, engines, runner = self.heap, self.engines, self.runner
        now = 0.0
        while heap:
            now = heap[0][0]
            while heap and heap[0][0] == now:
                _, _, kind, payload, version = heapq.heappop(heap)
                if kind == _ENGINE:
                    e = engines[payload]  # type: ignore[index]
                    if version == e.ev:
                        e.next_at = math.inf
                        self._boundary(e, now)
                elif kind == _FINISH:
                    if runner.finish(payload, version, now):  # type: ignore[arg-type]
                        self._action_done(payload, now)  # type: ignore[arg-type]
                elif kind == _UPDATE_DONE:
                    if self._publish(now):
                        return now
                else:
                    self.trainer_busy = False
                    self._try_train(now)
            runner.plan(now)
        raise RuntimeError(
            f"the loop stalled at t={now:.3f}s after {self.version} of {self.cfg.steps} updates: "
            f"{len(self.ready)} groups ready, {len(self.groups)} admitted"
        )

    # engines
    def _dispatch(self, tr: _Traj, now: float) -> None:
        engines, lh = self.engines, self.load_heap
        while lh[0][0] != engines[lh[0][1]].load:
            heapq.heappop(lh)  # an outdated load
        e = engines[lh[0][1]]
        self._set_load(e, e.load + 1)
        tr.engine = e.idx
        e.queue.append(tr)
        self._poke(e, now)

    def _set_load(self, e: _Engine, load: int) -> None:
        e.load = load
        heapq.heappush(self.load_heap, (load, e.idx))

    def _poke(self, e: _Engine, now: float) -> None:
        """Something changed for ``e`` (an arrival, new weights, a restart): act on it at the next
        step boundary, or now if it is idle."""
        if now < e.stalled_until:
            return  # the end of the stall is a boundary already
        if e.active:
            # The tolerance absorbs rounding when ``now`` is itself a boundary.
            k = math.ceil((now - e.seg_start) / e.dt - 1e-6)
            t = max(e.seg_start + k * e.dt, now)
        else:
            t = now
        if t < e.next_at:
            e.ev += 1
            e.next_at = t
            self._push(t, _ENGINE, e.idx, e.ev)

    def _boundary(self, e: _Engine, now: float) -> None:
        active = e.active
        if active:
            steps = round((now - e.seg_start) / e.dt)
            if steps > 0:
                e.counter += steps
                e.decode_s += steps * e.dt
                e.seq_s += steps * e.dt * len(active)
            fh = e.finish_heap
            while fh and fh[0][0] <= e.counter:
                _, uid, tr = heapq.heappop(fh)
                if active.pop(uid, None) is None:
                    continue  # purged earlier
                if not tr.alive:
                    self.tokens_wasted += e.counter - tr.join_counter
                    continue
                tr.segments.append((tr.seg_version, e.counter - tr.join_counter))
                tr.on_engine = False
                self._turn_done(tr, now)
            if e.dirty:
                for uid, tr in list(active.items()):
                    if not tr.alive:
                        self.tokens_wasted += e.counter - tr.join_counter
                        del active[uid]
                e.dirty = False
        if e.pending > e.version:
            for tr in active.values():
                tr.segments.append((tr.seg_version, e.counter - tr.join_counter))
                tr.join_counter, tr.seg_version = e.counter, e.pending
            e.version = e.pending
            sync_s = self.cfg.trainer.sync_s
            if sync_s > 0:
                e.stalled_until = e.seg_start = now + sync_s
                e.stall_s += sync_s
                e.ev += 1
                e.next_at = now + sync_s
                self._push(now + sync_s, _ENGINE, e.idx, e.ev)
                return
        queue = e.queue
        max_batch = self.cfg.engine.max_batch
        while queue and len(active) < max_batch:
            tr = queue.popleft()
            if not tr.alive:
                continue
            tr.join_counter, tr.seg_version = e.counter, e.version
            if tr.first_version < 0:
                tr.first_version = e.version
            tr.on_engine = True
            active[tr.uid] = tr
            heapq.heappush(e.finish_heap, (e.counter + tr.tokens[tr.turn], tr.uid, tr))
        if active:
            fh = e.finish_heap
            while fh[0][1] not in active:
                heapq.heappop(fh)  # a restarted trajectory's entry
            e.dt = self.cfg.engine.step_base_s + self.cfg.engine.step_per_seq_s * len(active)
            e.seg_start = now
            e.ev += 1
            e.next_at = now + (fh[0][0] - e.counter) * e.dt
            self._push(e.next_at, _ENGINE, e.idx, e.ev)

    # trajectories
    def _turn_done(self, tr: _Traj, now: float) -> None:
        if tr.turn < len(tr.tokens) - 1:
            action = tr.tools[tr.turn]
        else:
            tr.gen_done = True
            action = tr.reward
        self.owner[action.spec.id] = tr
        self.runner.submit(action, now)

    def _action_done(self, action_id: str, now: float) -> None:
        tr = self.owner.pop(action_id)
        if not tr.alive:
            return  # a restarted attempt's action: it ran, its result is dropped
        if not tr.gen_done:
            tr.turn += 1
            e = self.engines[tr.engine]
            e.queue.append(tr)
            self._poke(e, now)
            return
        tr.done = True
        e = self.engines[tr.engine]
        self._set_load(e, e.load - 1)
        group = self.groups[tr.group]
        group.n_done += 1
        if group.n_done == self.w.group_size:
            self.ready[group.gid] = None
            self._try_train(now)

    def _new_attempt(self, gid: int, slot: int, attempt: int) -> _Traj:
        tokens, tools, reward = draw_trajectory(self.w, self.cfg.seed, gid, slot, attempt)
        name = f"g{gid}s{slot}a{attempt}"
        return _Traj(next(_uids), name, gid, slot, attempt, tokens, tools, reward)

    def _admit(self, now: float) -> None:
        target = admission_target(self.cfg, self.version)
        while self.admitted < target:
            gid = self.admitted
            self.admitted += 1
            trajs = [self._new_attempt(gid, s, 0) for s in range(self.w.group_size)]
            self.groups[gid] = _Group(gid, trajs)
            for tr in trajs:
                self._dispatch(tr, now)

    def _restart(self, group: _Group, tr: _Traj, now: float) -> None:
        tr.alive = False
        self.restarts += 1
        self.tokens_wasted += sum(n for _, n in tr.segments)
        e = self.engines[tr.engine]
        if tr.done:
            group.n_done -= 1
            self.ready.pop(group.gid, None)
        else:
            self._set_load(e, e.load - 1)
        if tr.on_engine:
            e.dirty = True
            self._poke(e, now)
        new = self._new_attempt(group.gid, tr.slot, tr.attempt + 1)
        group.slots[tr.slot] = new
        self._dispatch(new, now)

    # trainer
    def _try_train(self, now: float) -> None:
        n = self.w.groups_per_step
        if self.trainer_busy or len(self.ready) < n:
            return
        gids = list(itertools.islice(self.ready, n))
        floor = self.version - self.cfg.max_staleness
        for gid in gids:
            del self.ready[gid]
            for tr in self.groups.pop(gid).slots:
                if tr.first_version < floor:
                    raise RuntimeError(
                        f"{tr.name}: oldest token from version {tr.first_version}, trainer at "
                        f"{self.version} with max_staleness {self.cfg.max_staleness}"
                    )
                self.samples.append(TrainedSample(tr.name, self.version, tuple(tr.segments)))
        self.trainer_busy = True
        self._push(now + self.cfg.trainer.update_s, _UPDATE_DONE, 0, 0)

    def _publish(self, now: float) -> bool:
        """An update ended: publish the new version; True when the run is complete."""
        self.version += 1
        self.update_end.append(now)
        if self.version >= self.cfg.steps:
            return True
        for e in self.engines:
            e.pending = self.version
            self._poke(e, now)
        if self.cfg.mode == "async":
            for group in list(self.groups.values()):
                for tr in list(group.slots):
                    if must_restart(self.cfg, tr, self.version):
                        self._restart(group, tr, now)
        self._admit(now)
        self._push(now + self.cfg.trainer.sync_s, _TRAINER_FREE, 0, 0)
        return False

    # results
    def result(self, end: float) -> RLLoopResult:
        cfg = self.cfg
        decode = seq = stall = 0.0
        for e in self.engines:
            if e.active and end > e.seg_start:
                decode += end - e.seg_start  # the step in progress counts as decoding
                seq += (end - e.seg_start) * len(e.active)
            decode += e.decode_s
            seq += e.seq_s
            stall += e.stall_s - max(e.stalled_until - end, 0.0)
        engine_time = cfg.engines * end
        ends = self.update_end
        start = ends[cfg.warmup_steps - 1] if cfg.warmup_steps else 0.0
        per_step = self.w.batch_size
        samples = self.samples
        tokens = sum(s.tokens for s in samples)
        off = sum(n for s in samples for v, n in s.segments if v < s.used_at_version)
        staleness = [s.staleness for s in samples]
        busy_trainer = cfg.steps * cfg.trainer.update_s + (cfg.steps - 1) * cfg.trainer.sync_s
        acts = self.actions
        return RLLoopResult(
            config=cfg,
            samples_trained=len(samples),
            makespan_s=end,
            update_end_s=tuple(ends),
            samples_per_s=(cfg.steps - cfg.warmup_steps) * per_step / (end - start),
            samples_per_s_overall=len(samples) / end,
            engine_idle=1.0 - decode / engine_time,
            engine_sync_stall=stall / engine_time,
            batch_occupancy=seq / (engine_time * cfg.engine.max_batch),
            mean_batch_decoding=seq / decode if decode else 0.0,
            trainer_idle=max(0.0, 1.0 - busy_trainer / end),
            max_staleness_seen=max(staleness),
            mean_staleness=sum(staleness) / len(staleness),
            off_policy_token_share=off / tokens,
            restarts=self.restarts,
            tokens_trained=tokens,
            tokens_wasted=self.tokens_wasted,
            act={
                "all": summarize(acts.acts()),
                "sandbox": summarize(acts.acts("sandbox")),
                "reward": summarize(acts.acts("reward")),
            },
            actions=acts,
            samples=tuple(samples),
        )


def simulate_rl_loop(config: RLLoopConfig, scheduler: Scheduler | None = None) -> RLLoopResult:
    """Run ``config.steps`` updates; external actions go through ``scheduler`` (by default a
    fresh :class:`ElasticScheduler` on ``config.capacity``). Deterministic for a given config."""
    loop = _Loop(config, scheduler or ElasticScheduler(config.capacity))
    return loop.result(loop.run())
