"""A generative judge: a causal LM reads a rubric prompt holding (prompt, response) and writes
a score, which :func:`~tangram_reward.models.judge_parse.parse_score` reads and normalises to
[0, 1].

Backends (:mod:`.judge_backends`): vLLM (``vllm.LLM``) where it is importable, else
transformers' ``AutoModelForCausalLM.generate``, which is slower (no paged attention or
continuous batching) but needs nothing beyond the ``[models]`` extra. ``backend`` in the
config picks one explicitly. Both get the same token ids, so a prompt reads the same to each.

Sampling is greedy by default: a reward should not change between two calls on the same pair.

``score_token_only`` makes the judge emit exactly one token, chosen among the tokens that
spell an integer of the rubric's range (vLLM ``allowed_token_ids``; a logits mask under
transformers): the reply always parses. It is for judges too small or too loosely tuned to
follow a format; a capable judge does better reasoning first (``max_tokens`` > 1, free text).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tangram_core import semconv
from tangram_reward.models.judge_backends import Reply
from tangram_reward.models.judge_parse import JudgeParseError, JudgeScore, parse_score
from tangram_reward.models.scalar_rm import validate_pairs

__all__ = ["DEFAULT_RUBRIC", "Judge", "JudgeConfig", "JudgeSpec", "JudgeVerdict"]

DEFAULT_RUBRIC = (
    "You are grading a response to a prompt. Rate how well the response answers the prompt "
    "on a scale from {min} (useless or wrong) to {max} (correct and complete).\n\n"
    "Prompt:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Reply with the score only, as <score>N</score>."
)
_FIELDS = {"prompt", "response", "min", "max"}


class JudgeSpec(BaseModel):
    """How the judge asks and samples; the ``judge:`` block of a deployment in YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rubric: str = Field(
        DEFAULT_RUBRIC,
        description="Prompt template with {prompt} and {response} (and optionally {min} and "
        "{max}, the score range); other braces must be doubled ({{ }}).",
    )
    score_min: int = Field(1, description="Lowest score of the rubric; normalised to 0.")
    score_max: int = Field(10, description="Highest score of the rubric; normalised to 1.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy: the same pair, same score.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="Tokens the judge may write.")
    seed: int | None = Field(None, description="Sampling seed (when temperature > 0).")
    score_token_only: bool = Field(
        False,
        description="Emit one token among those spelling an integer in the score range, so "
        "the reply always parses (for small judges).",
    )
    use_chat_template: bool = Field(
        True, description="Wrap the rubric as a user message when the tokenizer has a template."
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="'auto': vLLM when importable, else transformers."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(
        2048, ge=16, description="Prompt plus reply, in tokens; longer prompts are refused."
    )
    vllm_options: dict[str, Any] = Field(
        default_factory=dict,
        description="More keyword arguments of vllm.LLM, e.g. gpu_memory_utilization for a "
        "fractional GPU, or enforce_eager.",
    )

    @field_validator("rubric")
    @classmethod
    def _rubric_fields(cls, rubric: str) -> str:
        try:
            fields = {
                name for _, name, _, _ in string.Formatter().parse(rubric) if name is not None
            }
        except ValueError as exc:
            raise ValueError(
                f"rubric is not a valid template ({exc}); double literal braces"
            ) from None
        unknown = sorted(fields - _FIELDS)
        if unknown:
            raise ValueError(
                f"rubric has unknown placeholders {unknown}; use {sorted(_FIELDS)}, and double "
                "literal braces ({{ }})"
            )
        missing = sorted({"prompt", "response"} - fields)
        if missing:
            raise ValueError(f"rubric must contain {missing}: the judge has to see them")
        return rubric

    @model_validator(mode="after")
    def _range(self) -> JudgeSpec:
        if self.score_max <= self.score_min:
            raise ValueError(f"score_max ({self.score_max}) must be > score_min ({self.score_min})")
        if self.score_token_only and self.max_tokens != 1:
            raise ValueError(
                f"score_token_only writes exactly one token, but max_tokens is {self.max_tokens}; "
                "set max_tokens to 1"
            )
        return self


class JudgeConfig(JudgeSpec):
    """A :class:`JudgeSpec` with the checkpoint it runs; validated before anything loads."""

    path: Path = Field(description="Local directory of a transformers causal LM.")
    device: str = Field("cpu", description="transformers backend: 'cpu', 'cuda', ...")

    @field_validator("path")
    @classmethod
    def _checkpoint(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"judge model path {str(path)!r} does not exist or is not a folder")
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"{str(path)!r} has no config.json: not a transformers checkpoint")
        archs = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith("ForCausalLM") for a in archs):
            raise ValueError(
                f"{str(path)!r} is not a causal LM (architectures={archs}); a generative judge "
                "needs a *ForCausalLM checkpoint"
            )
        return path


@dataclass(frozen=True)
class JudgeVerdict:
    """What the judge said about one pair: its text, and the score or why there is none."""

    text: str
    score: JudgeScore | None
    error: JudgeParseError | None

    def checked(self) -> JudgeScore:
        """The score; raises the parse error when there is none (never a made-up 0)."""
        if self.score is None:
            assert self.error is not None  # set together in Judge.verdict
            raise self.error
        return self.score

    def reward(self) -> float:
        """The score normalised to [0, 1]; raises the parse error when there is none."""
        return self.checked().reward


class Judge:
    """Renders rubric prompts, generates with one backend call per batch, parses scores."""

    def __init__(self, config: JudgeConfig) -> None:
        from transformers import AutoTokenizer

        from tangram_reward.models.judge_backends import load_backend

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self._chat = config.use_chat_template and bool(self.tokenizer.chat_template)
        self.allowed_token_ids = (
            score_token_ids(self.tokenizer, config) if config.score_token_only else None
        )
        self.backend = load_backend(config, self.tokenizer)

    def encode(self, prompt: str, response: str) -> list[int]:
        """The judge's prompt for one pair, as token ids; raises ValueError if it is too long."""
        validate_pairs([prompt], [response])
        cfg = self.config
        text = cfg.rubric.format(
            prompt=prompt, response=response, min=cfg.score_min, max=cfg.score_max
        )
        if self._chat:
            messages = [{"role": "user", "content": text}]
            rendered: Any = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(str(rendered), add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text)["input_ids"]
        room = cfg.max_model_len - cfg.max_tokens
        if len(ids) > room:
            raise ValueError(
                f"judge prompt is {len(ids)} tokens; max_model_len ({cfg.max_model_len}) minus "
                f"max_tokens ({cfg.max_tokens}) leaves {room}: shorten the pair or raise "
                "max_model_len"
            )
        return list(ids)

    def generate(self, prompts: Sequence[list[int]]) -> list[Reply]:
        """The judge's reply to each prompt, in one backend call."""
        return self.backend.generate(list(prompts), self.allowed_token_ids)

    def span_attributes(self, input_tokens: int) -> dict[str, Any]:
        """GenAI semantic-convention attributes of one judge call, for its scoring span."""
        cfg = self.config
        attrs: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_TEXT_COMPLETION,
            semconv.GEN_AI_PROVIDER_NAME: self.backend.name,
            semconv.GEN_AI_REQUEST_MODEL: cfg.path.name,
            semconv.GEN_AI_REQUEST_MAX_TOKENS: cfg.max_tokens,
            semconv.GEN_AI_REQUEST_TEMPERATURE: cfg.temperature,
            semconv.GEN_AI_REQUEST_TOP_P: cfg.top_p,
            semconv.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        }
        if cfg.seed is not None:
            attrs[semconv.GEN_AI_REQUEST_SEED] = cfg.seed
        return attrs

    def verdict(self, text: str) -> JudgeVerdict:
        try:
            score = parse_score(text, self.config.score_min, self.config.score_max)
        except JudgeParseError as exc:
            return JudgeVerdict(text, None, exc)
        return JudgeVerdict(text, score, None)

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[JudgeVerdict]:
        """One verdict per pair (in-process use; the Serve deployment batches across calls)."""
        validate_pairs(prompts, responses)
        ids = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        return [self.verdict(reply.text) for reply in self.generate(ids)]

    def close(self) -> None:
        self.backend.close()


def score_token_ids(tokenizer: Any, spec: JudgeSpec) -> list[int]:
    """Ids of the tokens that spell an integer in the score range (with or without a leading
    space); raises ValueError naming the scores that no single token spells."""
    wanted = {str(v) for v in range(spec.score_min, spec.score_max + 1)}
    found: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip()
        if text in wanted:
            found.setdefault(text, []).append(token_id)
    missing = sorted(wanted - found.keys(), key=int)
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"score_token_only needs a single token for each score, but the tokenizer has none "
            f"for {missing[:10]}{more}; narrow the range (score_min/score_max) or turn "
            "score_token_only off"
        )
    return sorted(i for ids in found.values() for i in ids)
