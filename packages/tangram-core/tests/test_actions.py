"""The edge models reject bad input with messages that name the field and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tangram_core.actions import Action, ActionResult, ActionStatus
from tangram_core.elasticity import Amdahl, Elasticity, MeasuredSpeedup
from tangram_core.estimator import DurationEstimator
from tangram_core.scheduler import ActionSpec


def test_action_defaults_and_unique_ids():
    a, b = Action(kind="sandbox.run"), Action(kind="sandbox.run")
    assert a.id != b.id
    assert a.demand == {"cpu": 1.0}
    assert a.elasticity.rigid


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": ""}, "kind"),
        ({"kind": "x", "demand": {}}, "at least one resource type"),
        ({"kind": "x", "demand": {"cpu": 0}}, "amount > 0"),
        ({"kind": "x", "demand": {"gpu": -1}}, "amount > 0"),
        ({"kind": "x", "size": 0}, "size"),
        ({"kind": "x", "estimated_duration_s": -1}, "estimated_duration_s"),
        ({"kind": "x", "colour": "red"}, "colour"),  # unknown fields are rejected, not ignored
        (
            {"kind": "x", "elasticity": {"min_units": 4, "max_units": 2}},
            r"max_units \(2\) must be >= min_units \(4\)",
        ),
    ],
)
def test_action_rejects_bad_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        Action(**fields)


def test_amdahl_and_measured_speedups():
    amdahl = Amdahl(parallel_fraction=0.9)
    assert amdahl.factor(1) == pytest.approx(1.0)
    assert amdahl.factor(10) == pytest.approx(0.19)
    table = MeasuredSpeedup(factors={1: 1.0, 2: 0.6, 4: 0.4})
    assert [table.factor(u) for u in (1, 2, 3, 4, 9)] == [1.0, 0.6, 0.6, 0.4, 0.4]
    with pytest.raises(ValidationError, match="must not increase"):
        MeasuredSpeedup(factors={1: 1.0, 2: 0.5, 3: 0.7})
    with pytest.raises(ValidationError, match=r"must map 1 -> 1.0"):
        MeasuredSpeedup(factors={2: 0.5})


def test_elasticity_clamps_units_and_parses_from_json():
    e = Elasticity.model_validate(
        {
            "min_units": 2,
            "max_units": 4,
            "speedup": {"kind": "table", "factors": {"1": 1.0, "4": 0.3}},
        }
    )
    assert e.factor(1) == e.factor(2) == 1.0  # below the minimum runs at the minimum
    assert e.factor(16) == pytest.approx(0.3)


def test_spec_precomputes_factors_for_its_unit_range():
    action = Action(
        kind="t",
        elasticity=Elasticity(min_units=2, max_units=4, speedup=Amdahl(parallel_fraction=1.0)),
    )
    spec = ActionSpec.from_action(action)
    assert spec.factors == pytest.approx((0.5, 1 / 3, 0.25))
    assert spec.factor(3) == pytest.approx(1 / 3)
    assert spec.demand == (("cpu", 1.0),)


def test_result_timings():
    r = ActionResult(
        action_id="a",
        kind="k",
        status=ActionStatus.OK,
        submit_time=1.0,
        start_time=3.0,
        end_time=4.5,
    )
    assert (r.queue_wait_s, r.run_time_s, r.act_s, r.ok) == (2.0, 1.5, 3.5, True)
    never = ActionResult(
        action_id="b", kind="k", status=ActionStatus.REJECTED, submit_time=1.0, end_time=1.0
    )
    assert (never.queue_wait_s, never.run_time_s, never.ok) == (0.0, 0.0, False)


def test_estimator_prior_learning_drift_and_accuracy():
    est = DurationEstimator(prior_s=2.0, prior_weight=1.0, decay=0.1, priors={"rm": 5.0})
    assert est.estimate("new") == 2.0
    assert est.estimate("rm", size=2) == 10.0
    for _ in range(50):
        est.observe("k", size=2.0, t1_seconds=1.0)  # 0.5 s per unit of size
    assert est.estimate("k", size=4) == pytest.approx(2.0, rel=0.01)  # the prior has faded
    for _ in range(60):
        est.observe("k", size=1.0, t1_seconds=3.0)  # the kind got slower: the EWMA follows
    assert est.estimate("k") == pytest.approx(3.0, rel=0.01)
    acc = est.accuracy()["k"]
    assert acc.count == 110
    assert acc.mape > 0
    est.observe("k", size=1.0, t1_seconds=0.0)  # no information: ignored
    assert est.accuracy()["k"].count == 110


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prior_s": 0}, "prior_s"), ({"decay": 0}, "decay"), ({"prior_weight": -1}, "prior_weight")],
)
def test_estimator_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DurationEstimator(**kwargs)
