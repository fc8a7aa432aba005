"""The scalar reward model loads a real checkpoint and scores batches exactly like single pairs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tangram_reward.models import ScalarRewardModel, ScalarRewardModelConfig

PROMPTS = ["What is 2 + 2?", "Write a haiku.", "Name a prime number greater than 100.", "Hi"]
RESPONSES = ["4", "Autumn moonlight / a worm digs silently / into the chestnut.", "101", "Hello!"]


@pytest.fixture(scope="module")
def rm(tiny_rm_dir):
    return ScalarRewardModel(ScalarRewardModelConfig(path=tiny_rm_dir, batch_size=3))


def test_batched_scores_equal_single_scores(rm):
    batched = rm.score(PROMPTS, RESPONSES)  # batches of 3 and 1, with padding
    single = [rm.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) == len(batched)  # the model does read the text


def test_long_inputs_keep_their_end(tiny_rm_dir):
    rm = ScalarRewardModel(ScalarRewardModelConfig(path=tiny_rm_dir, max_length=16))
    a, b = rm.score(["x " * 500, "x " * 500], ["final answer 1", "final answer 2"])
    assert a != b  # left truncation: the differing end of the response is still seen


def test_model_path_errors_are_clear(tmp_path, tiny_model_dir):
    with pytest.raises(ValidationError, match="does not exist"):
        ScalarRewardModelConfig(path=tmp_path / "missing")
    with pytest.raises(ValidationError, match=r"has no config\.json"):
        ScalarRewardModelConfig(path=tmp_path)
    with pytest.raises(ValidationError, match="not a sequence-classification checkpoint"):
        ScalarRewardModelConfig(path=tiny_model_dir)  # a causal LM, not a reward model


@pytest.mark.parametrize(
    ("prompts", "responses", "error", "message"),
    [
        (["p"], [""], ValueError, "pair 0: response is empty"),
        (["p", "q"], ["r"], ValueError, "got 2 prompts but 1 responses"),
        (["p"], [3], TypeError, "pair 0: prompt and response must be str, got str and int"),
        ("p", "r", TypeError, "not a single str"),
    ],
)
def test_bad_pairs_are_named(rm, prompts, responses, error, message):
    with pytest.raises(error, match=message):
        rm.score(prompts, responses)
