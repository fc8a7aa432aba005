"""Rule-based rewards, against hand-checked cases (including the ways models game them)."""

from __future__ import annotations

import threading

import pytest

from tangram_reward.rules import (
    AnswerSource,
    extract_answer,
    language_consistency,
    math_accuracy,
    r1_format,
)


@pytest.mark.parametrize(
    ("text", "answer", "source"),
    [
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}", AnswerSource.BOXED),
        (r"\boxed{1} no wait \boxed{2}", "2", AnswerSource.BOXED),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}", AnswerSource.BOXED),
        ("<think>maybe 3</think><answer> 7 </answer>", "7", AnswerSource.ANSWER_TAG),
        (r"<answer>the value is \boxed{9}</answer>", "9", AnswerSource.BOXED),
        ("<think>try 10, then 12</think> It is 1,234 apples.", "1234", AnswerSource.LAST_NUMBER),
        ("<think>the answer is 5</think> I am not sure.", None, None),  # no answer after thinking
        ("The ratio is 3/4", "3/4", AnswerSource.LAST_NUMBER),
        (r"unclosed \boxed{12", "12", AnswerSource.LAST_NUMBER),
        ("no digits at all", None, None),
    ],
)
def test_extract_answer(text, answer, source):
    got = extract_answer(text)
    if answer is None:
        assert got is None
    else:
        assert got is not None
        assert (got.text, got.source) == (answer, source)


@pytest.mark.parametrize(
    ("response", "reference", "reward"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
        (r"\boxed{x = 2}", "2", 1.0),
        ("<answer>42</answer>", "42", 1.0),
        ("The answer is 41.", "42", 0.0),
        (r"\boxed{3} (but 42 is also nice)", "42", 0.0),  # the committed answer counts
        (r"\boxed{2x+2}", "2(x+1)", 1.0),
        (r"\boxed{[1, 3]}", r"[1,3]", 1.0),
        ("", "1", 0.0),
    ],
)
def test_math_accuracy(response, reference, reward):
    assert math_accuracy(response, reference) == reward


def test_math_accuracy_works_off_the_main_thread():
    """Ray Serve calls from worker threads, where math-verify's signal timeouts cannot work."""
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(math_accuracy(r"\boxed{\frac{2}{4}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


def test_math_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="reference answer must be a non-empty str"):
        math_accuracy(r"\boxed{1}", "")
    with pytest.raises(TypeError, match="response must be a str, got int"):
        math_accuracy(42, "42")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("<think>2 + 2 is 4</think>\n<answer>4</answer>", 1.0),
        ("  <think>\nsteps\n</think> <answer>\\boxed{4}</answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),  # no reasoning
        ("<think>steps</think>", 0.0),  # no answer
        ("<think>steps</think> so: <answer>4</answer>", 0.0),  # text between the blocks
        ("Sure! <think>steps</think><answer>4</answer>", 0.0),  # text before
        ("<think>steps</think><answer>4</answer> Hope that helps", 0.0),  # text after
        ("<think></think><answer>4</answer>", 0.0),  # empty reasoning
        ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # repeated answer
        ("<think>a <think>b</think><answer>4</answer>", 0.0),  # nested think
        ("<answer>4</answer><think>why</think>", 0.0),  # wrong order
    ],
)
def test_r1_format(response, reward):
    assert r1_format(response) == reward


def test_r1_format_with_think_opened_by_the_template():
    assert r1_format("steps</think><answer>4</answer>", think_prefilled=True) == 1.0
    assert r1_format("<think>steps</think><answer>4</answer>", think_prefilled=True) == 0.0


def test_language_consistency():
    assert language_consistency("<think>Let x = 2, so x^2 = 4.</think><answer>4</answer>") == 1.0
    mixed = language_consistency("<think>first 我们 compute</think>")
    assert mixed == pytest.approx(12 / 14)
    assert language_consistency("<think>我们计算</think>", target="zh") == 1.0
    assert language_consistency("<think>123 + 456</think>") == 1.0  # no letters: nothing to judge
    with pytest.raises(ValueError, match="unknown target language 'xx'"):
        language_consistency("hi", target="xx")
