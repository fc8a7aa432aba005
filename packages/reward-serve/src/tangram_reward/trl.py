"""Tangram's scoring as a TRL reward function: keep TRL's ``GRPOTrainer``, score with our rule
verifiers, the sandbox's test runs and reward-model deployments, each score a tangram action.

    from trl import GRPOConfig, GRPOTrainer
    from tangram_reward.trl import TangramReward, TrlRewardConfig

    reward = TangramReward(TrlRewardConfig(weights={"math": 1.0, "format": 0.2}))
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], args=GRPOConfig(...), ...)
    trainer.train()
    reward.close()

TRL calls a reward function with ``prompts``, ``completions`` (strings, or chat messages) and
every dataset column as a keyword argument holding one value per completion, and wants one
float per completion, ``None`` where the function does not apply. Here a completion's reward is
the weighted sum of the components that apply to its row: ``math`` needs a reference answer
(``reference_column``), ``countdown`` its numbers and target, ``code`` a list of tests
(``tests_column``); ``format``, ``language`` and ``rm`` always apply. A row where none applies
gets ``None`` (TRL then leaves it to the other reward functions).

Why actions and not direct calls: the same scheduler that serves r1-train queues, sizes,
retries and traces them (each is a span under ``OTEL_*``). The rules run as ``reward.rules``
actions in a local process pool (or on a Ray Serve rule deployment, ``rules_app``), code tests
as ``sandbox.run_tests`` actions on a local sandbox pool (the ``tangram-sandbox`` package), and
``rm`` as ``reward.rm`` actions on a deployed scalar reward model or judge (``rm_app``, e.g.
from :mod:`tangram_reward.serve_builder`). Only what the weights name is started.

A failure is never a silent score: a verifier that raises on a row (a bad reference) raises
:class:`ValueError` naming the row; a score the infrastructure could not produce (a worker lost
past its retries, a timeout) raises :class:`RewardUnavailable`, or gives ``None`` with
``infra_errors="none"``.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tangram_core.actions import Action, ActionResult, ActionStatus
from tangram_reward.rules.code_reward import CodeRewardRequest, Language, code_action, score_result
from tangram_reward.rules.request import Rule

__all__ = ["KIND_RM", "KIND_RULES", "RewardUnavailable", "TangramReward", "TrlRewardConfig"]

KIND_RULES = "reward.rules"
KIND_RM = "reward.rm"
Component = Literal["math", "format", "language", "countdown", "code", "rm"]
_RULES: tuple[Rule, ...] = ("math", "format", "language", "countdown")
_RULE_FN = "tangram_reward.rules.request:score_rule_request"
_MATH_ONLY: dict[Component, float] = {"math": 1.0}
T = TypeVar("T")


class RewardUnavailable(RuntimeError):
    """The infrastructure could not score a completion (a lost worker past its retries, a
    timeout, a refusal): not a score of 0."""


class TrlRewardConfig(BaseModel):
    """What to score and where the row's data is; validated before anything starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: dict[Component, float] = Field(
        default_factory=lambda: _MATH_ONLY.copy(),
        min_length=1,
        description="Components of the reward and their weights: the rules 'math', 'format', "
        "'language', 'countdown'; 'code' (sandbox tests); 'rm' (a reward-model deployment).",
    )
    reference_column: str = Field("answer", description="Dataset column of 'math' references.")
    numbers_column: str = Field("numbers", description="Column of 'countdown' numbers.")
    target_column: str = Field("target", description="Column of 'countdown' targets.")
    tests_column: str = Field(
        "tests", description="Column of 'code' test lists ({'stdin', 'expected_stdout'}, ...)."
    )
    think_prefilled: bool = Field(False, description="'format': the prompt opened <think>.")
    language: str = Field("en", description="'language': the language responses should use.")
    code_language: Language = Field("python", description="'code': the language of the tests.")
    code_scoring: Literal["fraction", "all"] = Field(
        "fraction", description="'code': the pass fraction, or 1 only when all tests pass."
    )
    rule_workers: int = Field(1, ge=1, description="Local processes that run rule actions.")
    sandbox_workers: int = Field(1, ge=1, description="Warm sandbox workers for 'code'.")
    rules_app: str | None = Field(
        None,
        min_length=1,
        description="Serve application of a rule deployment to score rules on, instead of "
        "local processes (needs a running Ray).",
    )
    rm_app: str | None = Field(
        None,
        min_length=1,
        description="Serve application of a scalar_rm or judge deployment ('rm' needs it).",
    )
    rm_deployment: str | None = Field(
        None, description="Deployment name inside rm_app (default: the app name)."
    )
    rules_deployment: str | None = Field(
        None, description="Deployment name inside rules_app (default: the app name)."
    )
    action_timeout_s: float | None = Field(
        120.0, gt=0, description="Longest one scoring action may run; then RewardUnavailable."
    )
    infra_errors: Literal["raise", "none"] = Field(
        "raise",
        description="A score the infrastructure could not produce: raise RewardUnavailable "
        "(stop the step), or give None for that completion (TRL treats it as missing).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrlRewardConfig:
        if "rm" in self.weights and self.rm_app is None:
            raise ValueError(
                "weights name 'rm' but rm_app is unset: set rm_app to the Serve application of "
                "a scalar_rm or judge deployment"
            )
        if self.rm_app is not None and "rm" not in self.weights:
            raise ValueError(f"rm_app={self.rm_app!r} is set but weights have no 'rm' component")
        bad = {k: v for k, v in self.weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"weights must be finite numbers; got {bad}")
        return self

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in _RULES if r in self.weights)


def completion_text(value: Any) -> str:
    """A completion as text: TRL passes a string, or (conversational data) a list of messages
    whose assistant contents are joined; a content may be text blocks (``{"type": "text"}``)."""
    return _messages_text(value, roles=("assistant",))


def prompt_text(value: Any) -> str:
    """A prompt as text: the string, or the last user message of a conversation."""
    if isinstance(value, str):
        return value
    users = [m for m in _as_messages(value) if m.get("role") == "user"]
    return _content(users[-1].get("content")) if users else _messages_text(value, roles=None)


def _as_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise TypeError(
            f"expected a str or a list of chat messages (dicts), got {type(value).__name__}"
        )
    return value


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text", ""))
            for b in content
            if isinstance(b, dict) and b.get("type") == "text"
        )
    return "" if content is None else str(content)


def _messages_text(value: Any, roles: tuple[str, ...] | None) -> str:
    if isinstance(value, str):
        return value
    return "".join(
        _content(m.get("content"))
        for m in _as_messages(value)
        if roles is None or m.get("role") in roles
    )


def _present(value: Any) -> bool:
    """A dataset cell that holds something (not None, NaN or an empty string or list)."""
    if value is None:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, str | list | tuple | dict):
        return bool(value.strip() if isinstance(value, str) else value)
    return True


def _column(columns: dict[str, Any], name: str, n: int) -> list[Any]:
    """One value per completion (None where the dataset has no such column)."""
    values = columns.get(name)
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


class _Loop:
    """An event loop on a daemon thread: TRL calls reward functions synchronously, while the
    orchestrator and its managers live on one loop across calls (a process pool is bound to
    the loop it started on)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="tangram-trl-reward", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class TangramReward:
    """A TRL reward function (``reward_funcs=[TangramReward(config)]``); see the module.

    The pools start on the first call and stop at :meth:`close` (or when the object is used
    as a context manager). It pickles as its config alone, so a copy starts its own pools."""

    def __init__(self, config: TrlRewardConfig | None = None, *, name: str = "tangram") -> None:
        self.config = config or TrlRewardConfig()
        self.__name__ = name  # TRL logs each reward function under its __name__
        self._loop: _Loop | None = None
        self._orchestrator: Any = None
        self._lock = threading.Lock()

    # -- TRL's reward-function signature -------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        """One reward per completion, ``None`` where no component applies to its row."""
        del completion_ids  # scored as text
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if not completions:
            return []
        state = columns.get("trainer_state")
        step = getattr(state, "global_step", None)
        loop = self._start()
        return loop.run(self._score(list(prompts), list(completions), columns, step))

    # -- lifecycle -----------------------------------------------------------------------------

    def _start(self) -> _Loop:
        with self._lock:
            if self._loop is None:
                managers = self._managers()  # raises, naming the missing package, before a loop
                loop = _Loop()
                try:
                    self._orchestrator = loop.run(self._open(managers))
                except BaseException:
                    loop.stop()
                    raise
                self._loop = loop
            return self._loop

    async def _open(self, managers: list[Any]) -> Any:
        from tangram_core.orchestrator import Orchestrator, OrchestratorConfig

        orch = Orchestrator(
            managers, config=OrchestratorConfig(action_timeout_s=self.config.action_timeout_s)
        )
        await orch.open()
        return orch

    def _managers(self) -> list[Any]:
        cfg = self.config
        managers: list[Any] = []
        if cfg.rules and cfg.rules_app is None:
            from tangram_core.process_pool import ProcessPoolConfig, ProcessPoolManager

            pool = ProcessPoolConfig(
                name="trl-rules",
                kinds=(KIND_RULES,),
                resource="reward",
                allowed_functions=(_RULE_FN,),
            )
            managers.append(ProcessPoolManager(cfg.rule_workers, config=pool))
        if "code" in cfg.weights:
            try:
                from tangram_sandbox.config import PoolConfig
                from tangram_sandbox.manager import SandboxManager
            except ImportError as exc:
                raise ImportError(
                    f"the 'code' reward runs tests in tangram-sandbox, which is not installed "
                    f"({exc}); pip install tangram-sandbox"
                ) from None
            workers = cfg.sandbox_workers
            managers.append(SandboxManager(PoolConfig(min_workers=workers, max_workers=workers)))
        for app, deployment, kind, resource in (
            (cfg.rules_app if cfg.rules else None, cfg.rules_deployment, KIND_RULES, "reward"),
            (cfg.rm_app, cfg.rm_deployment, KIND_RM, "reward_rm"),
        ):
            if app is not None:
                managers.append(_serve_manager(app, deployment, kind, resource))
        return managers

    def close(self) -> None:
        """Drain and stop the pools and the loop; a later call starts them again."""
        with self._lock:
            loop, orch = self._loop, self._orchestrator
            self._loop = self._orchestrator = None
        if loop is None:
            return
        try:
            loop.run(orch.shutdown())
        finally:
            loop.stop()

    def __enter__(self) -> TangramReward:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "name": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.__name__ = state["name"]
        self._loop = self._orchestrator = None
        self._lock = threading.Lock()

    # -- scoring -------------------------------------------------------------------------------

    async def _score(
        self,
        prompts: list[Any],
        completions: list[Any],
        columns: dict[str, Any],
        step: int | None,
    ) -> list[float | None]:
        cfg = self.config
        n = len(completions)
        texts = [completion_text(c) for c in completions]
        refs = _column(columns, cfg.reference_column, n)
        numbers = _column(columns, cfg.numbers_column, n)
        targets = _column(columns, cfg.target_column, n)
        tests = _column(columns, cfg.tests_column, n)
        jobs: list[tuple[int, str, Coroutine[Any, Any, dict[str, float] | None]]] = []
        for i, text in enumerate(texts):
            trajectory = f"trl-{step if step is not None else 'x'}-{i}"
            request = self._rule_request(text, refs[i], numbers[i], targets[i])
            if request is not None:
                jobs.append((i, KIND_RULES, self._rules(request, trajectory, step)))
            if "code" in cfg.weights and _present(tests[i]):
                code = CodeRewardRequest(
                    response=text or " ",
                    tests=list(tests[i]),
                    language=cfg.code_language,
                    scoring=cfg.code_scoring,
                )
                jobs.append((i, "code", self._code(code, trajectory, step)))
            if "rm" in cfg.weights:
                prompt = prompt_text(prompts[i])
                jobs.append((i, KIND_RM, self._rm(prompt, text, trajectory, step)))
        results = await asyncio.gather(*(job for _, _, job in jobs), return_exceptions=True)
        parts: list[dict[str, float] | None] = [{} for _ in range(n)]
        for (i, what, _), out in zip(jobs, results, strict=True):
            if isinstance(out, RewardUnavailable) and cfg.infra_errors == "none":
                parts[i] = None  # this completion is unscored, whatever else applied
                continue
            if isinstance(out, ValueError | RewardUnavailable):  # name the row
                raise type(out)(f"completion {i} ({what}): {out}") from out
            if isinstance(out, BaseException):
                raise out
            row = parts[i]
            if row is not None and out is not None:
                row.update(out)
        weights = {str(c): w for c, w in cfg.weights.items()}
        return [None if not row else sum(weights[c] * v for c, v in row.items()) for row in parts]

    def _rule_request(
        self, text: str, reference: Any, numbers: Any, target: Any
    ) -> dict[str, Any] | None:
        """The rule request of one row, with the rules that apply to it (None: none does)."""
        cfg = self.config
        rules: list[Rule] = []
        for rule in cfg.rules:
            if (rule == "math" and not _present(reference)) or (
                rule == "countdown" and not (_present(numbers) and _present(target))
            ):
                continue
            rules.append(rule)
        if not rules:
            return None
        request: dict[str, Any] = {
            "response": text or " ",  # an empty completion still scores (0), it is no error
            "rules": rules,
            "think_prefilled": cfg.think_prefilled,
            "language": cfg.language,
        }
        if "math" in rules:
            request["reference"] = str(reference)
        if "countdown" in rules:
            request.update(numbers=[int(x) for x in numbers], target=int(target))
        return request

    async def _submit(self, action: Action) -> ActionResult:
        return await self._orchestrator.submit(action)  # type: ignore[no-any-return]

    async def _rules(
        self, request: dict[str, Any], trajectory: str, step: int | None
    ) -> dict[str, float]:
        from tangram_core.process_pool import function_action

        fields: dict[str, Any] = {"trajectory_id": trajectory, "step_id": step}
        if self.config.rules_app is None:
            action = function_action(
                _RULE_FN, request, kind=KIND_RULES, demand={"reward": 1.0}, **fields
            )
        else:
            action = Action(
                kind=KIND_RULES, demand={"reward": 1.0}, payload={"request": request}, **fields
            )
        out = _checked(await self._submit(action), KIND_RULES)
        return {str(k): float(v) for k, v in out["scores"].items()}

    async def _code(
        self, req: CodeRewardRequest, trajectory: str, step: int | None
    ) -> dict[str, float]:
        action = code_action(req, trajectory_id=trajectory, step_id=step)
        if action is None:  # no code block: the policy's doing, a 0
            return {"code": 0.0}
        from tangram_reward.rules.code_reward import CodeRewardUnavailable

        try:
            return {"code": score_result(req, await self._submit(action)).reward}
        except CodeRewardUnavailable as exc:
            raise RewardUnavailable(str(exc)) from None

    async def _rm(
        self, prompt: str, text: str, trajectory: str, step: int | None
    ) -> dict[str, float]:
        action = Action(
            kind=KIND_RM,
            demand={"reward_rm": 1.0},
            payload={"prompt": prompt, "response": text or " "},
            trajectory_id=trajectory,
            step_id=step,
        )
        return {"rm": float(_checked(await self._submit(action), KIND_RM))}


def _checked(result: ActionResult, what: str) -> Any:
    """The action's output; a verifier that raised is the data's or reward's bug (ValueError),
    anything else that did not end OK is the infrastructure's (RewardUnavailable)."""
    if result.status is ActionStatus.OK:
        return result.output
    if result.status is ActionStatus.ERROR:
        raise ValueError(f"{what} raised {result.error_type or 'an error'}: {result.error}")
    raise RewardUnavailable(f"{what} {result.status.value}: {result.error}")


def _serve_manager(app: str, deployment: str | None, kind: str, resource: str) -> Any:
    """A RewardManager over a deployed Serve application; joins the running Ray cluster
    (``RAY_ADDRESS``, or the local one) if this process has not."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"{kind} on Serve application {app!r} needs Ray ({exc}); "
            "pip install 'tangram-reward-serve[serve]'"
        ) from None
    from tangram_reward.manager import RewardManager, RewardManagerConfig

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    config = RewardManagerConfig(app=app, deployment=deployment, kinds=(kind,), resource=resource)
    return RewardManager(config)
