"""A tiny random Llama checkpoint with its own byte-level BPE tokenizer, built offline in seconds.

Why: plumbing tests (vLLM loading, weight sync, GRPO steps, reward models) need a real
transformers/vLLM checkpoint, but no test may touch a model hub. The weights are random and
seeded, so the model is deterministic, not useful. head_dim is 32 because vLLM's CPU attention
supports nothing smaller.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# A ChatML template: r1-train and the reward judge format prompts through apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Enough varied text for BPE to learn merges for prose, arithmetic, tags and code."""
    words = [
        "the",
        "a",
        "an",
        "of",
        "to",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "was",
        "by",
        "be",
        "this",
        "are",
        "or",
        "from",
        "at",
        "which",
        "answer",
        "question",
        "think",
        "solve",
        "step",
        "first",
        "then",
        "so",
        "therefore",
        "result",
        "number",
        "sum",
        "product",
        "difference",
        "total",
        "value",
        "equal",
        "because",
        "we",
        "can",
        "write",
        "code",
        "function",
        "return",
        "print",
        "def",
        "import",
        "for",
        "while",
        "if",
        "else",
        "true",
        "false",
        "list",
        "dict",
        "int",
        "str",
        "range",
        "len",
    ]
    lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 3)]
    lines += [f"{a} + {b} = {a + b}" for a in range(0, 60, 7) for b in range(0, 60, 9)]
    lines += [f"{a} * {b} = {a * b}" for a in range(2, 30, 3) for b in range(2, 30, 4)]
    lines += [
        "<think> Let me work this out step by step. </think> <answer> 42 </answer>",
        "The final answer is \\boxed{17}.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
        "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
        "import math\nprint(math.sqrt(16))",
        "```python\nx = [1, 2, 3]\nprint(sum(x))\n```",
    ]
    return lines * 4


def build_tokenizer() -> object:
    """Train a byte-level BPE tokenizer in-process and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_fields(tokenizer: object) -> dict[str, object]:
    """The tiny Llama shape (head_dim 32, GQA 2:1) and special tokens, as config fields: shared by
    the causal LM, the reward model and the tiny HySparse model."""
    tok = tokenizer
    return {
        "vocab_size": len(tok),  # type: ignore[arg-type]
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA 2:1, as the real models have
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),  # type: ignore[attr-defined]
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),  # type: ignore[attr-defined]
        "pad_token_id": tok.convert_tokens_to_ids("<pad>"),  # type: ignore[attr-defined]
        "dtype": "float32",
    }


def tiny_config(tokenizer: object, **overrides: object) -> object:
    """The tiny Llama config: :func:`tiny_fields` with ``overrides``."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**tiny_fields(tokenizer), **overrides})


def save_causal_lm(model: object, tokenizer: object, out: Path, fixture: dict[str, object]) -> None:
    """Save a causal LM fixture: generation config from its special tokens, safetensors
    weights, the tokenizer, and ``tangram-fixture.json`` describing how it was built."""
    from transformers import GenerationConfig

    config = model.config  # type: ignore[attr-defined]
    model.generation_config = GenerationConfig(  # type: ignore[attr-defined]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    (out / "tangram-fixture.json").write_text(json.dumps(fixture, indent=1))


def build(out: Path) -> None:
    """Write tokenizer + seeded random Llama weights (safetensors) into ``out``."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    vocab = len(tokenizer)  # type: ignore[arg-type]
    save_causal_lm(model, tokenizer, out, {"kind": "tiny-llama", "seed": SEED, "vocab_size": vocab})
