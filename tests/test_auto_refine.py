"""The automatic refinement: its trigger on verified plans, and EndToEnd running it (or not) on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache
from quantplan.endtoend import EndToEnd, shipped_kld
from quantplan.planner import plan
from quantplan.planner.auto_refine import AutoRefine, recovery_share
from quantplan.planner.config import PlanConfig
from quantplan.planner.plan_types import Checks, Plan, Trigger, TriggerKind, Verification


@pytest.fixture(scope="module")
def job():
    model = tiny_llama(layers=4, hidden=128, intermediate=256)
    calibration = random_calibration(samples=8, seq_len=32)
    table = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
    return model, calibration, table


def verified(p: Plan, all_4bit: float, planned: float) -> Plan:
    record = Verification({"all-NF4": all_4bit, "plan": planned}, 256, "all-NF4", "plan")
    return replace(p, checks=replace(p.checks, verification=record))


def test_trigger_on_a_large_all_4bit_kl_or_a_missed_prediction(job):
    _, _, table = job
    p = plan(table, "+30%")
    predicted = 1 - p.predicted.error / p.predicted.error_all_4bit
    rule = AutoRefine()
    assert rule.trigger(p) is None  # not verified: nothing measured
    assert rule.trigger(verified(p, 0.6, 0.1)) == Trigger(TriggerKind.LARGE_ALL_4BIT_KL, 0.6, 0.5)
    holds = verified(p, 0.3, 0.3 * (1 - 0.8 * predicted))  # closed 80 % of the predicted share
    assert recovery_share(holds) == pytest.approx(0.8) and rule.trigger(holds) is None
    missed = verified(p, 0.3, 0.3 * (1 - 0.3 * predicted))
    fired = rule.trigger(missed)
    assert fired.kind is TriggerKind.PREDICTION_MISSED and fired.measured == pytest.approx(0.3)
    assert rule.trigger(verified(p, 0.3, 0.31)).kind is TriggerKind.PREDICTION_MISSED  # worse than all-4-bit
    with pytest.raises(ValueError, match="at least 1 round"):
        AutoRefine(rounds=0)


def test_refinement_record_with_its_trigger_round_trips_through_plan_json(job):
    _, _, table = job
    p = plan(table, "+30%")
    record = Checks.from_dict({"refinement": {"rounds": 2, "tokens": 10, "history": [], "objective_before": "fisher",
                                              "trigger": {"kind": "prediction_missed", "measured": 0.2,
                                                          "threshold": 0.5}, "seconds": 3.5, "shipped": False}})
    again = Plan.from_dict(json.loads(json.dumps(replace(p, checks=record).to_dict())))
    assert again.checks.refinement == record.refinement
    assert again.checks.refinement.trigger.kind is TriggerKind.PREDICTION_MISSED
    old = Checks.from_dict({"refinement": {"rounds": 2, "tokens": 10, "history": [], "objective_before": "fisher"}})
    assert old.refinement.trigger is None and old.refinement.shipped  # plan.json written before the trigger


def run_checks(job, end_to_end: EndToEnd) -> Plan:
    model, calibration, table = job
    shared = {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}
    return end_to_end.run_checks(table, "+30%", PlanConfig(), model, calibration, **shared)


def test_default_refines_by_itself_when_a_check_fires(job, capsys):
    first = run_checks(job, EndToEnd(refine=0))
    fires = AutoRefine(rounds=2, max_all_4bit_kld=0.0)  # every model counts as broken
    checked = run_checks(job, EndToEnd(auto=fires))
    record = checked.checks.refinement
    assert record is not None and record.trigger.kind is TriggerKind.LARGE_ALL_4BIT_KL
    assert record.rounds == 2 and len(record.history) == 2 and record.seconds > 0
    assert checked.checks.verification is not None
    line = [x for x in capsys.readouterr().out.splitlines() if "refined automatically" in x]
    assert len(line) == 1 and "2 rounds" in line[0] and "--refine 0 turns this off" in line[0]
    assert f"calibration KL {shipped_kld(first):.4g} -> " in line[0]
    assert shipped_kld(checked) <= shipped_kld(first)  # the better-measured plan ships
    if not record.shipped:
        assert checked.choices == first.choices


def test_default_leaves_the_plan_alone_where_the_checks_hold(job, capsys):
    """The tiny random model: all-4-bit KL far below 0.5 and the plan recovers what the table predicted."""
    checked = run_checks(job, EndToEnd())
    record = checked.checks.verification
    assert record.calibration_kld[record.all_4bit] < AutoRefine().max_all_4bit_kld
    assert recovery_share(checked) >= AutoRefine().min_recovery_share
    assert checked.checks.refinement is None and "refined automatically" not in capsys.readouterr().out


def test_refine_0_turns_the_automatic_refinement_off(job, capsys):
    checked = run_checks(job, EndToEnd(refine=0, auto=AutoRefine(rounds=1, max_all_4bit_kld=0.0)))
    assert checked.checks.refinement is None and checked.checks.verification is not None
    assert "refined automatically" not in capsys.readouterr().out


def test_model_card_says_why_the_refinement_ran_and_whether_it_shipped(job):
    from quantplan.planner.modelcard import _checks_text
    from quantplan.planner.plan_types import Refinement

    _, _, table = job
    p = plan(table, "+30%")
    trigger = Trigger(TriggerKind.LARGE_ALL_4BIT_KL, 0.8, 0.5)
    lost = replace(p, checks=Checks(Refinement(4, 100, (), "fisher", trigger, 12.0, shipped=False)))
    text = _checks_text(lost)
    assert "Refined automatically (all-4-bit's calibration KL 0.800" in text and "the first plan ships" in text
    asked = replace(p, checks=Checks(Refinement(4, 100, (), "fisher")))
    assert "Refined in 4 rounds" in _checks_text(asked) and "first plan ships" not in _checks_text(asked)
