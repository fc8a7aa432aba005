"""Completion log-probs from a padded batch, with logits only where completions are, equal each
sequence scored alone on its full logits (a real tiny Llama; no mocks)."""

from __future__ import annotations

from pathlib import Path

import torch

from r1_train.grpo import token_logprobs
from r1_train.policy import completion_logprobs, make_batch


class _AllPositions(torch.nn.Module):
    """The same model, ignoring ``logits_to_keep`` as some models do (HySparse's reference)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
        kwargs.pop("logits_to_keep", None)
        return self.model(input_ids=input_ids, **kwargs)


def test_kept_logits_give_each_sequences_own_logprobs(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    # Prompts of different lengths, completions of different lengths, one ending at the edge.
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in (5, 11, 8)]
    completions = [torch.randint(3, vocab, (n,)).tolist() for n in (7, 3, 9)]
    batch = make_batch(
        prompts, completions, [[1] * len(c) for c in completions], [0.0, 0.0, 0.0], pad_id=0
    )
    with torch.no_grad():
        kept = completion_logprobs(model, batch, slice(0, 3), temperature=0.7)
        every = completion_logprobs(_AllPositions(model), batch, slice(0, 3), temperature=0.7)
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            alone = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            want = token_logprobs(alone[None], torch.tensor([c]), temperature=0.7)[0]
            torch.testing.assert_close(kept[b, : len(c)], want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(every[b, : len(c)], want, rtol=1e-4, atol=1e-4)
