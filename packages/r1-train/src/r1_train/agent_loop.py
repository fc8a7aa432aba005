"""Multi-turn rollouts: the model writes code, the sandbox runs it, the output comes back.

Each turn generates for every live trajectory in one engine batch. A turn that ends in a code
block (``<code>...</code>``) becomes a ``sandbox.run`` action through tangram-core; the calls of
all trajectories go out together, so the scheduler sees actions from many trajectories at once.
The output is appended as an observation, whose tokens are masked out of the loss (the policy
did not write them), and the loop goes on until a turn ends without a tool call, the turn
budget is spent, or the token budget is.

A tool call whose sandbox fails (the infrastructure, not the code) marks the trajectory with
``infra_error``: it is reported and left out of training, never scored 0, because the model did
nothing wrong.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from r1_train.config import AgentConfig, RolloutConfig
from r1_train.rollout import Generation, GenRequest, RolloutEngine
from r1_train.tasks import Task
from tangram_core import semconv as sc
from tangram_core.actions import Action, ActionResult, ActionStatus, Submitter

_tracer = trace.get_tracer("r1_train")


class NoServices:
    """The submitter of a run that started no service (no tool calls, no sandbox or Ray
    reward): it refuses every action, naming it, instead of the loop checking for None."""

    async def submit(self, action: Action) -> ActionResult:
        raise RuntimeError(
            f"action {action.kind!r} was submitted, but this run started no service for it: "
            "tool calls need agent.max_turns > 1, rewards need rewards.weights"
        )


@dataclass
class ToolCall:
    code: str
    status: str
    output: str
    act_s: float
    queue_wait_s: float


@dataclass
class Trajectory:
    """One sample of a group: token ids after the prompt, with the loss mask and sampler
    log-probs aligned to them."""

    task: Task
    group: int
    member: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)
    truncated: bool = False
    infra_error: str | None = None
    texts: list[str] = field(default_factory=list)  # what the model wrote, per turn
    segments: list[str] = field(default_factory=list)  # model turns and observations, in order
    versions: list[int] = field(default_factory=list)  # policy version per token; -1: untracked
    reward: float | None = None
    reward_parts: dict[str, float] = field(default_factory=dict)
    action_act_s: dict[str, float] = field(default_factory=dict)  # reward action kind -> ACT

    @property
    def id(self) -> str:
        return f"{self.task.id}/g{self.group}s{self.member}"

    @property
    def response(self) -> str:
        """What the model wrote, all turns, without the tool outputs: what rewards grade.

        Tool outputs are left out so that an answer counts only if the model states it: a
        printed value in an observation is the sandbox's claim, not the model's."""
        return "".join(self.texts)

    @property
    def transcript(self) -> str:
        """The model's turns with the observations between them, as the model saw them."""
        return "".join(self.segments)

    @property
    def oldest_version(self) -> int | None:
        """The oldest policy version that sampled a trained token: what staleness is about."""
        tracked = [v for v, m in zip(self.versions, self.mask, strict=True) if m and v >= 0]
        return min(tracked) if tracked else None

    def append(
        self,
        ids: list[int],
        logprobs: list[float],
        trained: bool,
        versions: list[int] | None = None,
    ) -> None:
        self.completion_ids.extend(ids)
        self.mask.extend([1 if trained else 0] * len(ids))
        self.sampler_logprobs.extend(logprobs if trained else [0.0] * len(ids))
        self.versions.extend(versions if trained and versions is not None else [-1] * len(ids))


def find_tool_call(text: str, agent: AgentConfig) -> str | None:
    """The code of the last complete ``<code>...</code>`` block that ends the turn, if any."""
    pattern = re.escape(agent.code_open) + r"(.*?)" + re.escape(agent.code_close)
    calls = re.findall(pattern, text, flags=re.DOTALL)
    if not calls or not text.rstrip().endswith(agent.code_close):
        return None
    code = calls[-1].strip()
    return code or None


def observation(result: ActionResult, agent: AgentConfig) -> str:
    """What the model reads back: stdout (and the error, if it failed), clipped."""
    from tangram_sandbox.models import RunResult, RunStatus

    run = RunResult.from_action(result)
    text = run.stdout if run is not None else ""
    if run is not None and (run.status is not RunStatus.OK or run.stderr):
        tail = run.stderr.strip().splitlines()[-1:] or [run.status.value]
        text += f"\n{tail[0]}"
    if result.status is ActionStatus.ERROR:
        text += f"\nerror: {result.error}"
    text = text.strip()
    if len(text) > agent.max_observation_chars:
        text = text[: agent.max_observation_chars] + "...(truncated)"
    return f"\n{agent.output_open}\n{text}\n{agent.output_close}\n"


def step_priority(step: int) -> int:
    """The tangram priority of a step's actions: older steps first (higher runs first).

    Why: under asynchronous rollouts the trainer waits on the oldest step while up to
    ``max_staleness`` younger steps are in flight; their tool and reward actions must not queue
    ahead of the ones it waits on. Within one step (all of synchronous training) every action
    has the same priority, so the scheduler's own order (shortest estimate, aging) decides."""
    return -step


def _seed(base: int, step: int, index: int, turn: int) -> int:
    return (base * 1_000_003 + step * 10_007 + index * 101 + turn) % (2**31 - 1)


async def _run_tool(
    orch: Submitter, traj: Trajectory, code: str, agent: AgentConfig, step: int
) -> ActionResult:
    from tangram_sandbox.actions import run_action
    from tangram_sandbox.models import Limits, RunRequest

    limits = Limits(wall_s=agent.tool_wall_s, memory_mb=agent.tool_memory_mb)
    action = run_action(
        RunRequest(code=code, language="python", limits=limits),
        trajectory_id=traj.id,
        step_id=step,
        priority=step_priority(step),
    )
    with _tracer.start_as_current_span(
        sc.gen_ai_span_name(sc.OP_EXECUTE_TOOL, "python"),
        attributes={
            sc.GEN_AI_OPERATION_NAME: sc.OP_EXECUTE_TOOL,
            sc.GEN_AI_TOOL_NAME: "python",
            sc.GEN_AI_TOOL_TYPE: "function",
            sc.GEN_AI_TOOL_CALL_ID: action.id,
            sc.TRAJECTORY_ID: traj.id,
        },
    ) as span:
        result = await orch.submit(action)
        span.set_attribute(sc.ACTION_STATUS, result.status.value)
        return result


def _apply_tool_result(
    t: Trajectory, code: str, result: ActionResult, agent: AgentConfig, tokenizer: Any
) -> bool:
    """Append the observation; False (and ``infra_error`` set) if the sandbox itself failed."""
    obs = observation(result, agent)
    t.tool_calls.append(ToolCall(code, result.status.value, obs, result.act_s, result.queue_wait_s))
    if result.status in (ActionStatus.INFRA_ERROR, ActionStatus.REJECTED, ActionStatus.TIMEOUT):
        t.infra_error = f"sandbox.run {result.status.value}: {result.error}"
        return False
    t.append(tokenizer.encode(obs, add_special_tokens=False), [], trained=False)
    t.segments.append(obs)
    return True


async def _tool_round(
    orch: Submitter,
    trajs: list[Trajectory],
    calls: list[tuple[int, str]],
    agent: AgentConfig,
    step: int,
    clock: dict[str, float],
    tokenizer: Any,
) -> list[int]:
    """Run one tool call per listed trajectory, concurrently; returns those still live."""
    t0 = time.perf_counter()
    codes = [(i, find_tool_call(text, agent) or "") for i, text in calls]
    results = await asyncio.gather(*(_run_tool(orch, trajs[i], c, agent, step) for i, c in codes))
    clock["tools"] = clock.get("tools", 0.0) + time.perf_counter() - t0
    return [
        i
        for (i, code), result in zip(codes, results, strict=True)
        if _apply_tool_result(trajs[i], code, result, agent, tokenizer)
    ]


def _gen_span_attributes(
    model_name: str, cfg: RolloutConfig, step: int, turn: int, n: int
) -> dict[str, Any]:
    return {
        sc.GEN_AI_OPERATION_NAME: sc.OP_TEXT_COMPLETION,
        sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_VLLM,
        sc.GEN_AI_REQUEST_MODEL: model_name,
        sc.GEN_AI_REQUEST_TEMPERATURE: cfg.temperature,
        sc.GEN_AI_REQUEST_TOP_P: cfg.top_p,
        sc.GEN_AI_REQUEST_MAX_TOKENS: cfg.max_new_tokens,
        sc.GEN_AI_REQUEST_CHOICE_COUNT: n,
        sc.STEP_ID: step,
        sc.ROLLOUT_TURN: turn,
    }


def _new_trajectories(
    prompts: list[tuple[Task, str]], tokenizer: Any, cfg: RolloutConfig
) -> list[Trajectory]:
    trajs = []
    for g, (task, text) in enumerate(prompts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= cfg.max_total_tokens - 1:
            raise ValueError(
                f"task {task.id!r}: its prompt has {len(ids)} tokens, more than "
                f"rollout.max_total_tokens ({cfg.max_total_tokens}) allows"
            )
        trajs += [Trajectory(task, g, m, list(ids)) for m in range(cfg.group_size)]
    return trajs


def _budget(t: Trajectory, cfg: RolloutConfig) -> int:
    return min(cfg.max_new_tokens, cfg.max_total_tokens - len(t.prompt_ids) - len(t.completion_ids))


def _take_turn(
    t: Trajectory, gen: Generation, turn: int, agent: AgentConfig, tools: bool
) -> str | None:
    """Record a generated turn; returns the text holding a tool call to run, if any."""
    t.append(gen.token_ids, gen.logprobs, trained=True, versions=gen.versions)
    t.turns += 1
    t.texts.append(gen.text)
    t.segments.append(gen.text)
    seen = agent.prefill + gen.text if turn == 0 and not t.tool_calls else gen.text
    code = find_tool_call(seen, agent) if tools and turn + 1 < agent.max_turns else None
    if code is None and gen.finish_reason == "length":
        t.truncated = True
    return seen if code is not None else None


class TokenSource(Protocol):
    """Generates one request at a time, batching concurrent requests itself: the
    :class:`EngineBatcher` over a blocking engine, or the asynchronous mode's streaming engine."""

    model_name: str

    async def generate(self, request: GenRequest) -> Generation: ...


class EngineBatcher:
    """Lets trajectories that run independently share engine batches.

    Each trajectory awaits :meth:`generate`; requests that arrive while the engine is busy are
    sent together as the next batch. Generation of some trajectories thus overlaps the tool
    calls of others, and the engine still sees batches, not single requests.
    """

    def __init__(self, engine: RolloutEngine, clock: dict[str, float]) -> None:
        self.engine, self.clock = engine, clock
        self.model_name = engine.model_name
        self._pending: list[tuple[GenRequest, asyncio.Future[Generation]]] = []
        self._draining = False
        self._task: asyncio.Task[None] | None = None

    async def generate(self, request: GenRequest) -> Generation:
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # let every trajectory that is ready join this batch
                batch, self._pending = self._pending, []
                t0 = time.perf_counter()
                try:
                    gens = await asyncio.to_thread(self.engine.generate, [r for r, _ in batch])
                except Exception as exc:  # every waiter learns why
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                finally:
                    self.clock["generation"] = (
                        self.clock.get("generation", 0.0) + time.perf_counter() - t0
                    )
                for (_, fut), gen in zip(batch, gens, strict=True):
                    if not fut.done():
                        fut.set_result(gen)
        finally:
            self._draining = False


async def _independent(
    i: int,
    t: Trajectory,
    source: TokenSource,
    orch: Submitter,
    tokenizer: Any,
    cfg: RolloutConfig,
    agent: AgentConfig,
    step: int,
    seed: int,
    stop: tuple[str, ...],
    clock: dict[str, float],
) -> None:
    tools = agent.max_turns > 1
    try:
        if tools and find_tool_call(agent.prefill, agent):
            code = find_tool_call(agent.prefill, agent) or ""
            if not _apply_tool_result(
                t, code, await _run_tool(orch, t, code, agent, step), agent, tokenizer
            ):
                return
        for turn in range(agent.max_turns):
            budget = _budget(t, cfg)
            if budget <= 0:
                t.truncated = True
                return
            req = GenRequest(
                t.prompt_ids + t.completion_ids,
                budget,
                _seed(seed, step, i, turn),
                stop,
                group=i // cfg.group_size,
            )
            name = sc.gen_ai_span_name(sc.OP_TEXT_COMPLETION, source.model_name)
            attrs = _gen_span_attributes(source.model_name, cfg, step, turn, 1)
            with _tracer.start_as_current_span(name, attributes=attrs) as span:
                gen = await source.generate(req)
                if gen.versions:
                    span.set_attribute(sc.POLICY_VERSION, min(gen.versions))
                span.set_attribute(sc.GEN_AI_USAGE_INPUT_TOKENS, len(req.prompt_ids))
                span.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, len(gen.token_ids))
                span.set_attribute(sc.GEN_AI_RESPONSE_FINISH_REASONS, [gen.finish_reason])
            text = _take_turn(t, gen, turn, agent, tools)
            if text is None:
                return
            code = find_tool_call(text, agent) or ""
            t0 = time.perf_counter()
            result = await _run_tool(orch, t, code, agent, step)
            clock["tools"] = clock.get("tools", 0.0) + time.perf_counter() - t0
            if not _apply_tool_result(t, code, result, agent, tokenizer):
                return
    finally:
        end = getattr(orch, "end_trajectory", None)
        if callable(end):
            end(t.id)  # trajectory-bound baselines (static leases) release here


async def rollout(
    engine: RolloutEngine,
    orch: Submitter,
    tokenizer: Any,
    prompts: list[tuple[Task, str]],
    *,
    rollout_cfg: RolloutConfig,
    agent: AgentConfig,
    step: int,
    seed: int,
    timings: dict[str, float] | None = None,
) -> list[Trajectory]:
    """``group_size`` trajectories per (task, prompt text), all turns; groups stay contiguous.

    ``agent.lockstep`` picks how trajectories advance: all together, turn by turn, one engine
    batch per turn (deterministic); or each on its own, the engine batching whatever is pending
    (tool calls overlap generation). ``timings`` accumulates ``generation`` and ``tools``
    seconds."""
    clock = timings if timings is not None else {}
    trajs = _new_trajectories(prompts, tokenizer, rollout_cfg)
    stop = ((agent.code_close,) if agent.max_turns > 1 else ()) + tuple(rollout_cfg.stop)
    if not agent.lockstep:
        batcher = EngineBatcher(engine, clock)
        await asyncio.gather(
            *(
                _independent(
                    i, t, batcher, orch, tokenizer, rollout_cfg, agent, step, seed, stop, clock
                )
                for i, t in enumerate(trajs)
            )
        )
        return trajs
    tools = agent.max_turns > 1
    live = list(range(len(trajs)))
    if tools and find_tool_call(agent.prefill, agent):
        # The prefill itself ends in a tool call: run it before the model writes anything.
        prefilled = [(i, agent.prefill) for i in live]
        live = await _tool_round(orch, trajs, prefilled, agent, step, clock, tokenizer)
    for turn in range(agent.max_turns):
        requests, batch = [], []
        for i in live:
            t = trajs[i]
            budget = _budget(t, rollout_cfg)
            if budget <= 0:
                t.truncated = True
                continue
            ids = t.prompt_ids + t.completion_ids
            seed_i = _seed(seed, step, i, turn)
            group = i // rollout_cfg.group_size
            requests.append(GenRequest(ids, budget, seed_i, stop, group=group))
            batch.append(i)
        if not batch:
            break
        name = sc.gen_ai_span_name(sc.OP_TEXT_COMPLETION, engine.model_name)
        attrs = _gen_span_attributes(engine.model_name, rollout_cfg, step, turn, len(requests))
        with _tracer.start_as_current_span(name, attributes=attrs) as span:
            t0 = time.perf_counter()
            gens = await asyncio.to_thread(engine.generate, requests)
            clock["generation"] = clock.get("generation", 0.0) + time.perf_counter() - t0
            span.set_attribute(
                sc.GEN_AI_USAGE_INPUT_TOKENS, sum(len(r.prompt_ids) for r in requests)
            )
            span.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, sum(len(x.token_ids) for x in gens))
            span.set_attribute(
                sc.GEN_AI_RESPONSE_FINISH_REASONS, sorted({x.finish_reason for x in gens})
            )
        calls = [
            (i, text)
            for i, gen in zip(batch, gens, strict=True)
            if (text := _take_turn(trajs[i], gen, turn, agent, tools)) is not None
        ]
        if not calls:
            break
        live = await _tool_round(orch, trajs, calls, agent, step, clock, tokenizer)
    return trajs


async def rollout_group(
    source: TokenSource,
    orch: Submitter,
    tokenizer: Any,
    task: Task,
    prompt: str,
    *,
    slot: int,
    rollout_cfg: RolloutConfig,
    agent: AgentConfig,
    step: int,
    seed: int,
    clock: dict[str, float],
    retry: type[BaseException] | None = None,
) -> list[Trajectory]:
    """One group (``group_size`` samples of one prompt), each trajectory on its own.

    The asynchronous trainer's unit of work. ``slot`` is the prompt's place in its step, so the
    seeds are those the synchronous :func:`rollout` gives the same (step, prompt). A trajectory
    whose generation raises ``retry`` (a request dropped by a weight update) starts again from
    its prompt, under the new weights."""
    trajs = _new_trajectories([(task, prompt)], tokenizer, rollout_cfg)
    prompt_ids = trajs[0].prompt_ids
    g = rollout_cfg.group_size
    stop = ((agent.code_close,) if agent.max_turns > 1 else ()) + tuple(rollout_cfg.stop)

    async def one(member: int) -> None:
        while True:
            t = Trajectory(task, slot, member, list(prompt_ids))
            trajs[member] = t
            try:
                await _independent(
                    slot * g + member,
                    t,
                    source,
                    orch,
                    tokenizer,
                    rollout_cfg,
                    agent,
                    step,
                    seed,
                    stop,
                    clock,
                )
                return
            except BaseException as exc:
                if retry is None or not isinstance(exc, retry):
                    raise

    await asyncio.gather(*(one(m) for m in range(g)))
    return trajs
