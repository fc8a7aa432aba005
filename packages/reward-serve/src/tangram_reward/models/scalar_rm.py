"""A scalar reward model: a transformers sequence-classification checkpoint that scores
(prompt, response) pairs, in batches.

Why the care with padding and truncation: a reward model reads its score from the last real
token. If padding is on the wrong side, or the pad token is unknown to the model, a batched
score silently differs from the same pair scored alone. We pad on the right with a pad token the
config knows, and truncate from the *left*: the end of a response is what the model must see.
A test checks that batched and one-by-one scores agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ScalarRewardModelConfig(BaseModel):
    """Where the checkpoint is and how to run it; validated before anything loads."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path = Field(description="Local directory of an AutoModelForSequenceClassification.")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(16, ge=1, description="Pairs per forward pass.")
    max_length: int = Field(2048, ge=16, description="Tokens kept per pair (from the end).")
    use_chat_template: bool = Field(
        True, description="Format pairs with the tokenizer's chat template when it has one."
    )

    @field_validator("path")
    @classmethod
    def _checkpoint(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"reward model path {str(path)!r} does not exist or is not a folder")
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"{str(path)!r} has no config.json: not a transformers checkpoint")
        data = json.loads(config.read_text())
        archs = data.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{str(path)!r} is not a sequence-classification checkpoint "
                f"(architectures={archs}); a reward model needs a *ForSequenceClassification head"
            )
        if data.get("num_labels", len(data.get("id2label", {0: 0}))) != 1:
            raise ValueError(
                f"{str(path)!r} has {data.get('num_labels')} labels; a scalar reward needs 1"
            )
        return path


class ScalarRewardModel:
    """Scores (prompt, response) pairs with one forward pass per batch."""

    def __init__(self, config: ScalarRewardModelConfig) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.config = config
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            config.path, dtype=getattr(torch, config.dtype)
        ).to(config.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self._chat = config.use_chat_template and bool(self.tokenizer.chat_template)

    def _format(self, prompt: str, response: str) -> str:
        if self._chat:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            text: Any = self.tokenizer.apply_chat_template(messages, tokenize=False)
            return str(text)
        return prompt + response

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One float per pair; raises ValueError/TypeError naming the first bad item."""
        validate_pairs(prompts, responses)
        texts = [self._format(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        bs = self.config.batch_size
        with self._torch.inference_mode():
            for i in range(0, len(texts), bs):
                enc = self.tokenizer(
                    texts[i : i + bs],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.config.max_length,
                ).to(self.config.device)
                logits = self.model(**enc).logits
                out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out


def validate_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """The checks every reward entry point shares: same lengths, strings, non-empty responses."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of str, not a single str")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(
                f"pair {i}: prompt and response must be str, got "
                f"{type(p).__name__} and {type(r).__name__}"
            )
        if not r.strip():
            raise ValueError(f"pair {i}: response is empty; there is nothing to score")
