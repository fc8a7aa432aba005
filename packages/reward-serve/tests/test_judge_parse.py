"""The judge's score parser on hand-written judge replies: what parses, and what is an error."""

from __future__ import annotations

import pickle

import pytest

from tangram_reward.models.judge_parse import JudgeParseError, parse_score


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("Score: 7/10", 7),
        ("score=7", 7),
        ("<score>3</score>", 3),
        ("<SCORE> 4.5 </SCORE>", 4.5),
        ("<score>8/10</score>", 8),
        ("7", 7),
        ("  10.  ", 10),
        ("**6**", 6),
        ("7/10", 7),
        ("Rating: 9", 9),
        ("**Score**: 2", 2),
        ("Score:** 5", 5),
        ("The final score is 8.", 8),
        ("Grade of 1", 1),
        # Reasoning first, verdict last: the last score of the strongest form wins.
        ("Step 1 deserves score: 3. Overall, Score: 6", 6),
        ("It mentions score: 2 but <score>9</score>", 9),
        ("Score: 4 ... on reflection <score>5</score> and score: 1", 5),
    ],
)
def test_scores_that_parse(text, raw):
    score = parse_score(text, 1, 10)
    assert score.raw == raw
    assert score.reward == pytest.approx((raw - 1) / 9)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no score found"),
        ("I think it's pretty good!", "no score found"),
        ("\x03\x03 360 154re\\ 78re", "no score found"),  # what a random-weights model writes
        ("7 because it is fine", "no score found"),  # a number, but not a verdict
        ("scores: 7", "no score found"),  # not the label
        ("<score>seven</score>", "no score found"),
        ("Score: 11", "outside the rubric's range 1-10"),
        ("<score>0</score>", "outside the rubric's range 1-10"),
        ("Score: -3", "outside the rubric's range 1-10"),
        ("Score: 4/5", "is over 5, but the rubric's scale is 1-10"),
        ("<score>8/100</score>", "is over 100"),
    ],
)
def test_no_usable_score_is_an_error_never_zero(text, reason):
    with pytest.raises(JudgeParseError, match=reason) as err:
        parse_score(text, 1, 10)
    assert err.value.text == text
    assert "\n" not in str(err.value)  # one line: callers across Ray report the last line


def test_normalisation_and_ranges():
    assert parse_score("<score>0</score>", 0, 4).reward == 0.0
    assert parse_score("<score>4</score>", 0, 4).reward == 1.0
    assert parse_score("<score>1</score>", 0, 4).reward == 0.25
    assert parse_score("Score: 4/4", 0, 4).reward == 1.0
    with pytest.raises(ValueError, match=r"max \(3\) must be > min \(3\)"):
        parse_score("3", 3, 3)


def test_error_keeps_the_raw_text_shortened_and_survives_pickling():
    long = "no verdict here. " * 100
    with pytest.raises(JudgeParseError) as caught:
        parse_score(long, 1, 10)
    err = caught.value
    assert err.text == long
    assert len(str(err)) < 500
    back = pickle.loads(pickle.dumps(err))  # it crosses from a Serve replica to the caller
    assert isinstance(back, JudgeParseError)
    assert (back.reason, back.text, str(back)) == (err.reason, err.text, str(err))
    assert isinstance(back, ValueError)
