"""The run's configuration: one pydantic tree, loaded from YAML plus ``a.b=value`` overrides.

Every field is validated at the edge, unknown fields are refused (a typo must not silently fall
back to a default), and cross-field rules state the invariant, the values and the fix, as TRL's
``GRPOConfig`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1_train.eval_section import EvalSection, check_periodic_eval
from r1_train.grpo_options import (
    AdvantageScale,
    ImportanceSamplingLevel,
    ISCorrection,
    LossType,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: Path = Field(description="Local checkpoint folder of the policy (HF layout).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 where the hardware computes in it, else fp32."
    )

    @model_validator(mode="after")
    def _exists(self) -> ModelConfig:
        if not (self.path / "config.json").is_file():
            raise ValueError(
                f"model.path {str(self.path)!r} holds no config.json; point it at a local "
                "checkpoint folder (e.g. `make models` builds .cache/models/smollm2-135m-instruct)"
            )
        return self


class RolloutConfig(_Strict):
    engine: Literal["vllm", "openai"] = Field("vllm", description="In-process vLLM or a server.")
    group_size: int = Field(4, ge=1, description="Samples per prompt (GRPO's G).")
    max_new_tokens: int = Field(128, ge=1, description="Tokens the model may write per turn.")
    max_total_tokens: int = Field(512, ge=16, description="Prompt + all turns, the hard cap.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1: no top-k.")
    stop: tuple[str, ...] = Field((), description="Extra stop strings.")
    server_url: str | None = Field(
        None,
        description="engine=openai: a vLLM server on this host, started with "
        "VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls r1_train.vllm_sync.WeightSyncExtension.",
    )
    enforce_eager: bool = True
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM CPU KV cache (GiB).")

    @model_validator(mode="after")
    def _server(self) -> RolloutConfig:
        if self.engine == "openai" and not self.server_url:
            raise ValueError(
                "rollout.engine 'openai' needs rollout.server_url, e.g. http://127.0.0.1:8000"
            )
        if self.max_new_tokens >= self.max_total_tokens:
            raise ValueError(
                f"rollout.max_new_tokens ({self.max_new_tokens}) must be < max_total_tokens "
                f"({self.max_total_tokens}), which also holds the prompt"
            )
        return self


class AgentConfig(_Strict):
    """Multi-turn tool use: the model writes code, the sandbox runs it, the output comes back."""

    max_turns: int = Field(1, ge=1, description="1: single-turn, no tool calls.")
    code_open: str = "<code>"
    code_close: str = "</code>"
    output_open: str = "<output>"
    output_close: str = "</output>"
    max_observation_chars: int = Field(512, ge=16, description="Tool output kept per call.")
    tool_wall_s: float = Field(5.0, gt=0, le=300, description="Wall-clock limit per tool call.")
    tool_memory_mb: int = Field(256, ge=16)
    lockstep: bool = Field(
        True,
        description="All trajectories advance turn by turn in one engine batch (deterministic: "
        "--resume replays bit for bit). False: each runs on its own and the engine batches what "
        "is pending, so tool calls overlap generation (faster with slow tools).",
    )
    prefill: str = Field(
        "", description="Text that opens the model's first turn (part of the prompt, not trained)."
    )


class GRPOConfig(_Strict):
    loss_type: LossType = Field(
        "grpo",
        description="grpo: sequence means, then their mean (R1). dapo: token sum over the whole "
        "batch's tokens. bnpo: TRL's, each micro-batch's token mean over the number of "
        "micro-batches (dapo with one micro-batch). dr_grpo: token sum over sequences x the "
        "longest answer allowed (rollout.max_new_tokens x agent.max_turns).",
    )
    epsilon_low: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0, description="DAPO clip-higher (e.g. 0.28).")
    beta: float = Field(
        0.0, ge=0, description="KL coefficient to the frozen reference (R1: 0.001)."
    )
    use_bias_correction_kl: bool = Field(
        False,
        description="Multiply the KL term by the policy ratio (unbiased reverse-KL gradient, "
        "DeepSeek-V3.2). TRL 1.16 turns it on by default; here it is off, R1's plain k3 KL.",
    )
    importance_sampling_level: ImportanceSamplingLevel = Field(
        "token",
        description="token: PPO ratio per token. sequence: GSPO, one ratio per sequence "
        "(exp of its mean token log-ratio), clipped per sequence; pair it with loss_type grpo.",
    )
    scale: AdvantageScale = Field("group", description="Advantage deviation: group, batch, none.")
    dynamic_sampling: bool = Field(False, description="Drop groups whose rewards are all equal.")
    mask_truncated: bool = Field(False, description="Overlong filtering: no loss on cut answers.")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty window (tokens).")
    overlong_penalty: float = Field(1.0, ge=0)
    updates_per_batch: int = Field(1, ge=1, description="Optimiser passes over each batch.")
    is_correction: ISCorrection = Field(
        "tis",
        description="Off-policy correction of the surrogate by pi_trainer / pi_sampler: tis "
        "(= token_truncate) caps each token's weight at is_cap, mis (= token_mask) drops tokens "
        "outside [1/is_cap, is_cap]; sequence_truncate / sequence_mask do the same with one "
        "weight per sequence (the product of its token ratios; TRL's default is sequence_mask "
        "with cap 3); none.",
    )
    is_cap: float = Field(2.0, gt=1, description="Importance-weight cap (truncate) or band (mask).")
    max_nonfinite_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Stop the run when more than this fraction of a step's rewards, or of its "
        "trained tokens' sampler log-probs, is NaN or infinite. Below it, a non-finite reward "
        "gets advantage 0 and a non-finite log-prob no correction; both are counted and logged.",
    )


class OptimConfig(_Strict):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's eps (TRL/transformers' name).")
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward.")


TaskKind = Literal["arithmetic", "countdown", "code", "jsonl", "parquet"]


class TaskConfig(_Strict):
    kind: TaskKind = "arithmetic"
    path: Path | None = Field(None, description="jsonl/parquet: the file.")
    size: int = Field(256, ge=1, description="Generated tasks: how many.")
    seed: int = 0
    template: Literal["r1_zero", "chat", "plain"] = "chat"
    max_operand: int = Field(50, ge=1, description="Arithmetic/countdown number range.")

    @model_validator(mode="after")
    def _path(self) -> TaskConfig:
        if self.kind in ("jsonl", "parquet"):
            if self.path is None:
                raise ValueError(f"task.kind {self.kind!r} needs task.path")
            if not self.path.is_file():
                raise ValueError(f"task.path {str(self.path)!r} does not exist")
        return self


RewardName = Literal["math", "format", "code", "countdown", "rm"]


class RewardsConfig(_Strict):
    weights: dict[RewardName, float] = Field(
        default_factory=lambda: {"math": 1.0},  # type: ignore[arg-type]
        description="Reward components and weights.",
    )
    rule_replicas: int = Field(1, ge=1)
    code_test_units: int = Field(
        1,
        ge=1,
        description="'code': most sandbox workers one reward's tests may be spread over; the "
        "scheduler gives the extra ones only when they are idle.",
    )
    rm_path: Path | None = Field(None, description="'rm': a sequence-classification checkpoint.")

    @model_validator(mode="after")
    def _rm(self) -> RewardsConfig:
        if not self.weights:
            raise ValueError("rewards.weights must name at least one reward, e.g. {math: 1.0}")
        if "rm" in self.weights and self.rm_path is None:
            raise ValueError("reward 'rm' needs rewards.rm_path (a local reward-model folder)")
        return self


class SandboxConfig(_Strict):
    workers: int = Field(2, ge=1, description="Sandbox pool size (tool calls and code tests).")
    provisioning: Literal["tangram", "static"] = Field(
        "tangram",
        description="tangram: every action scheduled on the shared pool. static: the baseline "
        "where a trajectory leases one sandbox for its whole life (needs agent.lockstep false).",
    )


class AsyncConfig(_Strict):
    """``run.mode: async``: the engine generates ahead of the trainer, within a staleness bound."""

    max_staleness: int = Field(
        1,
        ge=0,
        description="A step that trains policy version v may use tokens sampled by versions "
        ">= v - max_staleness; 0 is the synchronous schedule.",
    )
    on_update: Literal["continue", "drop"] = Field(
        "continue",
        description="New weights reach the engine between decode steps. continue: trajectories "
        "in flight go on under the new weights (partial rollout); drop: they are aborted and "
        "generated again from the start.",
    )
    recompute_kv: bool = Field(
        True,
        description="continue: recompute in-flight requests' KV cache under the new weights "
        "(else the cached keys and values of the old weights are kept, as PipelineRL does).",
    )


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class _RoleConfig(_Strict):
    """What each member of a role (a trainer rank, a rollout engine) asks of the cluster: one
    Ray placement-group bundle per member."""

    strategy: PlacementStrategy = Field(
        "PACK", description="Ray placement strategy of the role's bundles."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per member.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per member (1 on a GPU cluster; 0 trains on CPU with gloo)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per member, to pin a role to nodes that offer them.",
    )


class TrainerRoleConfig(_RoleConfig):
    ranks: int = Field(1, ge=1, description="Trainer ranks (data parallel, FSDP2 when > 1).")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend: auto is nccl with GPUs, else gloo."
    )


class RolloutRoleConfig(_RoleConfig):
    engines: int = Field(1, ge=1, description="vLLM engines, each a Ray actor.")


class SandboxPlacementConfig(_Strict):
    """Where a cluster run's sandbox pool runs: a Ray actor, placed by Ray."""

    num_cpus: float | None = Field(
        None, ge=0, description="CPUs reserved for the pool; None: one per sandbox.workers."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, to pin the pool to nodes."
    )


class ClusterConfig(_Strict):
    """``cluster.*``: run the trainer ranks and rollout engines as Ray actors on a cluster.

    Without it the run is the embedded one-machine run. See the README's Cluster section."""

    address: str = Field(
        "auto",
        description="auto: RAY_ADDRESS or a running `ray start` on this node; local: start a "
        "Ray for this run only; else a cluster address (host:port or ray://host:port).",
    )
    layout: Literal["auto", "split", "shared"] = Field(
        "auto",
        description="split: rollout engines on nodes that hold no trainer rank; shared: Ray "
        "places both roles where they fit; auto: split when the cluster has several nodes.",
    )
    trainer: TrainerRoleConfig = Field(default_factory=TrainerRoleConfig)
    rollout: RolloutRoleConfig = Field(default_factory=RolloutRoleConfig)
    sandbox: SandboxPlacementConfig = Field(default_factory=SandboxPlacementConfig)
    weight_sync: Literal["object_store"] = Field(
        "object_store",
        description="How new weights reach the engines: object_store (rank 0 puts the whole "
        "state dict into Ray's object store once; each engine pulls it to its node).",
    )
    placement_timeout_s: float = Field(
        300.0, gt=0, description="How long to wait for the cluster to fit a role's bundles."
    )


class RunConfig(_Strict):
    mode: Literal["sync", "async"] = Field(
        "sync", description="async: rollouts run ahead of training (see the asynchronous section)."
    )
    steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(4, ge=1)
    seed: int = 0
    out_dir: Path = Path("runs/r1")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps; 0: at the end only.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in out_dir.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Evaluate (the eval section) on the rollout engine every N steps and after "
        "the last; 0: never. TRL's eval_steps, verl's trainer.test_freq.",
    )
    progress: bool = True
    tensorboard: bool = True


class TrainConfig(_Strict):
    """Everything one run needs; ``r1-train run --config FILE.yaml a.b=value`` builds it."""

    model: ModelConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    asynchronous: AsyncConfig = Field(default_factory=AsyncConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    cluster: ClusterConfig | None = Field(
        None, description="Set (even to {}) to place trainer ranks and engines on a Ray cluster."
    )
    eval: EvalSection | None = Field(None, description="What run.eval_every evaluates.")
    eval_task: TaskConfig | None = Field(
        None,
        description="The tasks eval.benchmark 'tasks' scores (TRL's eval_dataset, verl's "
        "data.val_files); default: task.* with seed + 1, a held-out draw of generated tasks.",
    )

    @property
    def held_out_task(self) -> TaskConfig:
        """What ``eval.benchmark 'tasks'`` scores: ``eval_task``, else the training tasks drawn
        with the next seed (generated tasks only differ by seed; a file or the built-in code
        problems are the same set, so set ``eval_task`` for a held-out split of those)."""
        if self.eval_task is not None:
            return self.eval_task
        return self.task.model_copy(update={"seed": self.task.seed + 1})

    @property
    def max_completion_length(self) -> int:
        """The most tokens the model may write in one trajectory (prompt and tool outputs not
        counted): Dr. GRPO's constant and TRL's ``max_completion_length``."""
        return self.rollout.max_new_tokens * self.agent.max_turns

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        g = self.rollout.group_size
        if self.grpo.scale == "group" and g < 2:
            raise ValueError(
                f"rollout.group_size ({g}) must be >= 2 with grpo.scale 'group' (a group's "
                "deviation needs two samples); raise group_size or set grpo.scale to 'batch'"
            )
        if self.grpo.overlong_buffer > self.rollout.max_new_tokens * self.agent.max_turns:
            raise ValueError(
                f"grpo.overlong_buffer ({self.grpo.overlong_buffer}) exceeds the longest answer "
                f"({self.rollout.max_new_tokens} x {self.agent.max_turns} turns)"
            )
        if self.sandbox.provisioning == "static" and self.agent.lockstep:
            raise ValueError(
                "sandbox.provisioning 'static' leases a sandbox per trajectory, which deadlocks "
                "trajectories that advance in lockstep; set agent.lockstep to false"
            )
        if self.run.mode == "async" and self.rollout.engine != "vllm":
            raise ValueError(
                "run.mode 'async' updates weights between decode steps of the in-process engine; "
                "set rollout.engine to 'vllm'"
            )
        if self.cluster is not None and self.rollout.engine != "vllm":
            raise ValueError(
                "cluster.* starts its own vLLM engines as Ray actors; set rollout.engine to "
                "'vllm' (rollout.server_url is for one server on this host)"
            )
        check_periodic_eval("run.eval_every", self.run.eval_every, self.eval)
        if self.run.eval_every and self.run.mode == "async":
            raise ValueError(
                "run.eval_every evaluates between synchronous steps; with run.mode 'async' set "
                "run.save_every and score the checkpoints with `r1-train eval`"
            )
        if self.task.kind == "code" and "code" not in self.rewards.weights:
            raise ValueError("task.kind 'code' is scored by tests: add 'code' to rewards.weights")
        if "countdown" in self.rewards.weights and self.task.kind != "countdown":
            raise ValueError(
                f"reward 'countdown' needs task.kind 'countdown' (got {self.task.kind!r})"
            )
        return self


class ConfigError(ValueError):
    """A bad config: the message lists every bad field with its rule."""


def read_config_file(path: Path | None) -> dict[str, Any]:
    """A config file's mapping (empty without a file); every way it can be unreadable is a
    :class:`ConfigError` naming the file. Shared by every command's loader."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top")
    return loaded or {}


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Set ``section.field=value`` (the value parsed as YAML) in ``tree``, in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {name!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({exc.problem}); quote "
            "strings that start with * or & (e.g. '[\"*.q_proj.*\"]')"
        ) from None


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """YAML file, then ``a.b=value`` overrides (values parsed as YAML), then validation."""
    tree = read_config_file(path)
    for item in overrides:
        apply_override(tree, item)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            at = ".".join(str(p) for p in e["loc"]) or "(top)"
            if e["type"] == "extra_forbidden":
                lines += [f"  {leaf}: {_unknown(leaf)}" for leaf in _leaves(at, e["input"])]
            else:
                lines.append(f"  {at}: {e['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n" + "\n".join(lines)) from None


def field_names(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every leaf field of the config tree, dotted (``grpo.beta``, ``cluster.trainer.ranks``)."""
    import typing

    out = []
    for name, info in model.model_fields.items():
        args = typing.get_args(info.annotation) or (info.annotation,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            out += field_names(nested[0], f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _leaves(dotted: str, value: Any) -> list[str]:
    """The dotted leaves under an unknown key (a whole unknown section, such as verl's
    ``actor_rollout_ref: {...}``, names each field in it)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{dotted}.{k}", v)]
    return [dotted]


def _unknown(dotted: str) -> str:
    from r1_train.names import suggest

    hint = suggest(dotted, field_names())
    return "unknown field" + (f"; {hint}" if hint else "")
