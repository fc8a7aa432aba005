"""Prompt templates: R1-Zero's, the model's own chat template, or the bare question.

R1-Zero (DeepSeek-R1 paper) puts a short preamble before the question: the assistant reasons
inside ``<think> </think>`` and answers inside ``<answer> </answer>``, nothing else is asked of
it. Instruct models are better served by their own chat template, with the same instructions as
a system message. With tools on, the instructions say how to call them.
"""

from __future__ import annotations

from typing import Any, Literal

from r1_train.config import AgentConfig
from r1_train.tasks import Task

Template = Literal["r1_zero", "chat", "plain"]

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it. The Assistant first thinks through the reasoning, then gives the answer. The "
    "reasoning is enclosed in <think> </think> and the answer in <answer> </answer>, i.e. "
    "<think> reasoning here </think> <answer> answer here </answer>."
)

ANSWER_HINT = {
    "math": "Give the final answer as a number inside <answer> </answer>.",
    "countdown": "Give the equation inside <answer> </answer>, e.g. <answer>(1 + 2) * 3</answer>.",
    "code": "Write a Python program in a ```python code block.",
}


def tool_instructions(agent: AgentConfig) -> str:
    if agent.max_turns < 2:
        return ""
    return (
        f" You can run Python: write code between {agent.code_open} and {agent.code_close}, "
        f"and its output comes back between {agent.output_open} and {agent.output_close}."
    )


def chat_messages(task: Task, agent: AgentConfig) -> list[dict[str, str]]:
    """The chat template's messages for ``task``: what the model is prompted with, and what an
    SFT row of its answer must hold (``r1-train sample``)."""
    hint = ANSWER_HINT[task.type] + tool_instructions(agent)
    return [
        {"role": "system", "content": f"You are a helpful assistant. {hint}"},
        {"role": "user", "content": task.prompt},
    ]


def render_prompt(task: Task, template: Template, agent: AgentConfig, tokenizer: Any) -> str:
    """The text the engine continues for ``task``; ends where the model starts writing."""
    hint = ANSWER_HINT[task.type] + tool_instructions(agent)
    if template == "plain":
        return f"{task.prompt}\n{hint}\n"
    if template == "r1_zero":
        return f"{R1_ZERO}{tool_instructions(agent)}\nUser: {task.prompt} {hint}\nAssistant:"
    messages = chat_messages(task, agent)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "task.template 'chat' needs a tokenizer with a chat template; this model has none "
            "(use task.template 'r1_zero' or 'plain')"
        )
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
