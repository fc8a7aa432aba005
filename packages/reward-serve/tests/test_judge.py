"""The generative judge in-process on the real tiny Llama (random weights) with the transformers
backend: config errors, prompts, one generate per batch, and a constrained reply that parses.

vLLM runs the same judge through Serve in ``test_judge_serve.py`` (its engine takes long to
start, so those tests share one per module)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tangram_reward.models.judge import Judge, JudgeConfig, JudgeSpec, score_token_ids
from tangram_reward.models.judge_parse import JudgeParseError

PROMPTS = ["What is 2 + 2?", "Name a prime number greater than 100."]
RESPONSES = ["4", "101"]


def hf_judge(path, **overrides) -> Judge:
    return Judge(JudgeConfig(path=path, backend="transformers", dtype="float32", **overrides))


@pytest.fixture(scope="module")
def free(tiny_model_dir) -> Judge:
    return hf_judge(tiny_model_dir, max_tokens=8)


@pytest.fixture(scope="module")
def constrained(tiny_model_dir) -> Judge:
    return hf_judge(tiny_model_dir, score_min=0, score_max=9, score_token_only=True, max_tokens=1)


def test_config_errors_name_the_fix(tmp_path, tiny_model_dir, tiny_rm_dir):
    with pytest.raises(ValidationError, match="does not exist"):
        JudgeConfig(path=tmp_path / "missing")
    with pytest.raises(ValidationError, match=r"has no config\.json"):
        JudgeConfig(path=tmp_path)
    with pytest.raises(ValidationError, match=r"needs a \*ForCausalLM"):
        JudgeConfig(path=tiny_rm_dir)  # a reward model, not a causal LM
    with pytest.raises(ValidationError, match=r"unknown placeholders \['answer'\]"):
        JudgeSpec(rubric="{prompt} {response} {answer}")
    with pytest.raises(ValidationError, match=r"must contain \['response'\]"):
        JudgeSpec(rubric="Rate: {prompt}")
    with pytest.raises(ValidationError, match="not a valid template"):
        JudgeSpec(rubric="{prompt} {response} {")
    with pytest.raises(ValidationError, match=r"score_max \(2\) must be > score_min \(5\)"):
        JudgeSpec(score_min=5, score_max=2)
    with pytest.raises(ValidationError, match="set max_tokens to 1"):
        JudgeSpec(score_token_only=True)
    with pytest.raises(ValidationError, match="temperature"):
        JudgeSpec(temperature=-1)
    assert JudgeSpec(rubric="{{json}} {prompt} {response}").rubric  # doubled braces are text
    assert JudgeConfig(path=tiny_model_dir).temperature == 0.0  # greedy by default


def test_prompt_is_the_rubric_in_the_chat_template(free):
    ids = free.encode("What is 2 + 2?", "4")
    text = free.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nYou are grading a response")
    assert "on a scale from 1 (useless or wrong) to 10" in text
    assert "Prompt:\nWhat is 2 + 2?\n\nResponse:\n4\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_bad_pairs_and_long_prompts_are_refused(tiny_model_dir, free):
    with pytest.raises(ValueError, match="response is empty"):
        free.encode("p", "  ")
    with pytest.raises(TypeError, match="must be str"):
        free.encode("p", 3)  # type: ignore[arg-type]
    short = hf_judge(tiny_model_dir, max_model_len=64, max_tokens=8)
    with pytest.raises(ValueError, match=r"max_model_len \(64\) minus max_tokens \(8\) leaves 56"):
        short.encode("p", "word " * 100)


def test_free_text_verdicts_are_a_score_or_an_error_with_the_text(free):
    verdicts = free.judge(PROMPTS, RESPONSES)
    assert len(verdicts) == 2
    for v in verdicts:
        assert v.text  # greedy on random weights: garbage, but deterministic
        if v.score is None:
            assert isinstance(v.error, JudgeParseError)
            assert v.error.text == v.text
            with pytest.raises(JudgeParseError):
                v.reward()  # never a silent 0
        else:
            assert 0.0 <= v.reward() <= 1.0
    again = free.judge(PROMPTS, RESPONSES)
    assert [v.text for v in again] == [v.text for v in verdicts]  # greedy: same reply


def test_span_attributes_follow_genai_semconv(free, constrained):
    from tangram_core import semconv

    attrs = free.span_attributes(input_tokens=42)
    assert attrs[semconv.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[semconv.GEN_AI_PROVIDER_NAME] == "transformers"
    assert attrs[semconv.GEN_AI_REQUEST_MODEL] == "tiny-llama"
    assert attrs[semconv.GEN_AI_REQUEST_MAX_TOKENS] == 8
    assert attrs[semconv.GEN_AI_REQUEST_TEMPERATURE] == 0.0
    assert attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] == 42
    ids = [free.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert all(1 <= reply.output_tokens <= 8 for reply in free.generate(ids))
    assert [reply.output_tokens for reply in constrained.generate(ids)] == [1, 1]


def test_batched_replies_equal_single_replies(free):
    batched = free.generate([free.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    single = [
        free.generate([free.encode(p, r)])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert batched == single  # left padding does not change what the judge reads


def test_score_token_only_always_gives_a_score(constrained):
    ids = constrained.allowed_token_ids
    assert ids is not None
    assert {constrained.tokenizer.decode([i]).strip() for i in ids} == {str(d) for d in range(10)}
    verdicts = constrained.judge(PROMPTS * 2, RESPONSES * 2)
    for v in verdicts:
        assert v.error is None, v.text
        assert v.text.strip() in {str(d) for d in range(10)}
        assert v.reward() == pytest.approx(int(v.text) / 9)


def test_score_token_only_needs_a_token_per_score(constrained):
    spec = JudgeSpec(score_min=0, score_max=1000, score_token_only=True, max_tokens=1)
    with pytest.raises(ValueError, match=r"has none for \['13', '15', .*\] and \d+ more; narrow"):
        score_token_ids(constrained.tokenizer, spec)
