"""What TRL and verl call our config fields, so that their users' names are answered.

Why: a TRL user types ``num_generations`` and a verl user ``actor_rollout_ref.rollout.n``;
"extra inputs are not permitted" tells neither of them what to write instead. Unknown fields
are refused (a typo must not fall back to a default silently), and the refusal names the field
we call it, with the framework whose name was used. The README's table is this one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# other framework's name (its own spelling: TRL's GRPOConfig field, verl's dotted path) ->
# (our dotted field, the framework, a note where the meaning differs)
FOREIGN_NAMES: dict[str, tuple[str, str, str]] = {
    # TRL GRPOConfig / TrainingArguments
    "num_generations": ("rollout.group_size", "TRL", ""),
    "max_completion_length": (
        "rollout.max_new_tokens",
        "TRL",
        "per turn; a trajectory may write max_new_tokens x agent.max_turns",
    ),
    "max_prompt_length": ("rollout.max_total_tokens", "TRL", "ours caps prompt + completion"),
    "temperature": ("rollout.temperature", "TRL", ""),
    "top_p": ("rollout.top_p", "TRL", ""),
    "top_k": ("rollout.top_k", "TRL", ""),
    "epsilon": ("grpo.epsilon_low", "TRL", ""),
    "epsilon_high": ("grpo.epsilon_high", "TRL", ""),
    "beta": ("grpo.beta", "TRL", ""),
    "num_iterations": ("grpo.updates_per_batch", "TRL", ""),
    "loss_type": ("grpo.loss_type", "TRL", ""),
    "scale_rewards": ("grpo.scale", "TRL", "group, batch or none"),
    "mask_truncated_completions": ("grpo.mask_truncated", "TRL", ""),
    "importance_sampling_level": ("grpo.importance_sampling_level", "TRL", ""),
    "vllm_importance_sampling_correction": ("grpo.is_correction", "TRL", ""),
    "vllm_importance_sampling_mode": ("grpo.is_correction", "TRL", ""),
    "vllm_importance_sampling_cap": ("grpo.is_cap", "TRL", ""),
    "reward_weights": ("rewards.weights", "TRL", "a mapping: {math: 1.0, format: 0.5}"),
    "learning_rate": ("optim.lr", "TRL", ""),
    "weight_decay": ("optim.weight_decay", "TRL", ""),
    "adam_beta1": ("optim.betas", "TRL", "a pair: [beta1, beta2]"),
    "adam_beta2": ("optim.betas", "TRL", "a pair: [beta1, beta2]"),
    "adam_epsilon": ("optim.adam_epsilon", "TRL", ""),
    "max_grad_norm": ("optim.grad_clip", "TRL", ""),
    "lr_scheduler_type": ("optim.schedule", "TRL", ""),
    "warmup_steps": ("optim.warmup_steps", "TRL", ""),
    "per_device_train_batch_size": ("optim.micro_batch_size", "TRL", ""),
    "max_steps": ("run.steps", "TRL", ""),
    "seed": ("run.seed", "TRL", ""),
    "output_dir": ("run.out_dir", "TRL", ""),
    "save_steps": ("run.save_every", "TRL", ""),
    "eval_steps": ("run.eval_every", "TRL", "and an eval section: what to evaluate"),
    "eval_dataset": ("eval_task.path", "TRL", "a JSONL or Parquet file, or eval_task.kind"),
    "model_name_or_path": ("model.path", "TRL", "a local folder: the machine is offline"),
    "torch_dtype": ("model.dtype", "TRL", ""),
    # verl (ppo_trainer.yaml), by dotted path
    "actor_rollout_ref.model.path": ("model.path", "verl", ""),
    "actor_rollout_ref.rollout.n": ("rollout.group_size", "verl", ""),
    "actor_rollout_ref.rollout.temperature": ("rollout.temperature", "verl", ""),
    "actor_rollout_ref.rollout.top_p": ("rollout.top_p", "verl", ""),
    "actor_rollout_ref.rollout.top_k": ("rollout.top_k", "verl", ""),
    "data.max_response_length": (
        "rollout.max_new_tokens",
        "verl",
        "per turn; a trajectory may write max_new_tokens x agent.max_turns",
    ),
    "data.max_prompt_length": ("rollout.max_total_tokens", "verl", "ours caps prompt + response"),
    "data.train_batch_size": ("run.prompts_per_step", "verl", "prompts, before x group_size"),
    "actor_rollout_ref.actor.clip_ratio": ("grpo.epsilon_low", "verl", ""),
    "actor_rollout_ref.actor.clip_ratio_low": ("grpo.epsilon_low", "verl", ""),
    "actor_rollout_ref.actor.clip_ratio_high": ("grpo.epsilon_high", "verl", ""),
    "actor_rollout_ref.actor.kl_loss_coef": ("grpo.beta", "verl", ""),
    "actor_rollout_ref.actor.use_kl_loss": ("grpo.beta", "verl", "beta > 0 turns the KL on"),
    "actor_rollout_ref.actor.ppo_epochs": ("grpo.updates_per_batch", "verl", ""),
    "actor_rollout_ref.actor.loss_agg_mode": (
        "grpo.loss_type",
        "verl",
        "token-mean: dapo; seq-mean-token-mean: grpo; seq-mean-token-sum-norm: dr_grpo",
    ),
    "actor_rollout_ref.actor.optim.lr": ("optim.lr", "verl", ""),
    "actor_rollout_ref.actor.optim.weight_decay": ("optim.weight_decay", "verl", ""),
    "actor_rollout_ref.actor.grad_clip": ("optim.grad_clip", "verl", ""),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": ("optim.micro_batch_size", "verl", ""),
    "algorithm.norm_adv_by_std_in_grpo": ("grpo.scale", "verl", "true: group; false: none"),
    "trainer.total_training_steps": ("run.steps", "verl", ""),
    "trainer.save_freq": ("run.save_every", "verl", ""),
    "trainer.test_freq": ("run.eval_every", "verl", "and an eval section: what to evaluate"),
    "data.val_files": ("eval_task.path", "verl", "one JSONL or Parquet file"),
    "trainer.default_local_dir": ("run.out_dir", "verl", ""),
    "trainer.n_gpus_per_node": (
        "cluster.trainer.ranks",
        "verl",
        "ranks and engines are set apart: cluster.trainer.ranks, cluster.rollout.engines",
    ),
    "trainer.nnodes": ("cluster.trainer.ranks", "verl", "Ray places the ranks on the nodes"),
}
# the last component alone also answers (verl users often write kl_loss_coef under grpo.)
_BY_LEAF: dict[str, str] = {}
for _key in FOREIGN_NAMES:
    _BY_LEAF.setdefault(_key.rsplit(".", 1)[-1], _key)


def suggest(dotted: str, known: Iterable[str]) -> str:
    """A hint for the unknown field ``dotted``: our name for a TRL or verl field, or the
    closest of ``known`` (our dotted field names); empty when nothing is close."""
    foreign = FOREIGN_NAMES.get(dotted) or FOREIGN_NAMES.get(
        _BY_LEAF.get(dotted.rsplit(".", 1)[-1], "")
    )
    if foreign is not None:
        ours, framework, note = foreign
        source = dotted if dotted in FOREIGN_NAMES else dotted.rsplit(".", 1)[-1]
        return f"did you mean {ours}? ({framework}'s {source}" + (f"; {note})" if note else ")")
    known = list(known)
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.75)
    if not close:  # the right name in the wrong section, or a near miss of the leaf
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        close = [by_leaf[near[0]]] if near else []
    return f"did you mean {close[0]}?" if close else ""
