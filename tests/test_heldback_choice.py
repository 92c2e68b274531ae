"""The refined plan is weighed against the first one on calibration batches the refinement did not fit."""

from __future__ import annotations

import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.kept_hidden import KeptHidden
from quantplan.analysis.reference import KLReference, VariantKLs
from quantplan.analysis.simulate import QuantCache
from quantplan.endtoend import EndToEnd, Measures
from quantplan.planner.config import PlanConfig
from quantplan.planner.modelcard import _checks_text
from quantplan.planner.plan_types import Checks


@pytest.fixture(scope="module")
def job():
    model = tiny_llama(layers=4, hidden=128, intermediate=256)
    calibration = random_calibration(samples=8, seq_len=32)  # 2 batches of 4
    table = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
    return model, calibration, table


def test_a_reference_from_a_later_batch_covers_only_its_batches(job):
    model, calibration, _ = job
    batches = [b["input_ids"] for b in calibration.batches(2)]  # 4 batches of 2
    later = KLReference(model, calibration, batch_size=2, max_batches=2, first_batch=1)
    assert later.count == 2 and later.tokens == 2 * 2 * 32
    assert all(torch.equal(b["input_ids"], expected)
               for b, expected in zip(later.batches(), batches[1:3], strict=True))
    assert KLReference(model, calibration, batch_size=2, first_batch=3).count == 1  # what is left
    kept = KeptHidden(batches=None, batch_size=2, calibration=calibration.fingerprint)
    kept.states.update({i: torch.full((1,), float(i)) for i in range(4)})
    assert kept.lend(later, calibration) == 2  # batches 1 and 2, as the later reference's 0 and 1
    assert float(later.hidden16(0, None)) == 1.0 and float(later.hidden16(1, None)) == 2.0


def test_held_back_batches_exist_only_where_a_refinement_runs_and_batches_are_left(job):
    model, calibration, _ = job
    config = AnalyzeConfig(samples=8, seq_len=32, batch_size=4)
    reference = EndToEnd(refine=2, max_batches=1).heldback_reference(model, calibration, config)
    assert (reference.first_batch, reference.count) == (1, 1)
    assert EndToEnd(max_batches=1).heldback_reference(model, calibration, config) is not None  # automatic: may run
    assert EndToEnd(refine=0, max_batches=1).heldback_reference(model, calibration, config) is None
    assert EndToEnd(refine=2, max_batches=1, verify=False).heldback_reference(model, calibration, config) is None
    assert EndToEnd(refine=2, max_batches=2).heldback_reference(model, calibration, config) is None  # none left
    assert EndToEnd(refine=2, max_tokens=None).heldback_reference(model, calibration, config) is None  # all used


@pytest.mark.parametrize("refined_wins", [True, False])
def test_the_held_back_kls_choose_what_ships(job, refined_wins, capsys):
    """With --refine: the first plan (verified as without it) and the refined plan, measured on the held-back batch;
    the lower ships and the record says so. The held-back KLs are scripted here, the rest is measured."""
    model, calibration, table = job
    cache = QuantCache(model, NF4)
    measures = Measures.in_memory(KLReference(model, calibration, 4, 1), cache, progress=False)
    kld = {"first plan": 0.2, "refined": 0.1} if refined_wins else {"first plan": 0.1, "refined": 0.2}
    asked = []

    def heldback(configs):
        asked.append(set(configs))
        return VariantKLs(kld, 128)

    measures = Measures(measures.gains, measures.klds, False, heldback)
    end_to_end = EndToEnd(refine=1, max_batches=1)
    shipped = end_to_end.checks(table, "+30%", PlanConfig(), measures)
    unrefined = EndToEnd(refine=0, max_batches=1).checks(table, "+30%", PlanConfig(), measures)
    refined = EndToEnd(refine=1, max_batches=1).checks(table, "+30%", PlanConfig(), Measures(
        measures.gains, measures.klds, False))  # no held-back batches: the refined plan ships as before
    assert asked == [{"first plan", "refined"}]
    record = shipped.checks.refinement
    assert record.shipped is refined_wins and record.heldback_kld == kld and record.heldback_tokens == 128
    assert shipped.choices == (refined if refined_wins else unrefined).choices
    assert f"the {'refined' if refined_wins else 'first'} plan ships" in capsys.readouterr().out
    assert "on 128 held-back calibration tokens" in _checks_text(shipped)  # the model card says how it was chosen


def test_the_measured_choice_on_a_real_held_back_batch(job):
    model, calibration, table = job
    config = AnalyzeConfig(samples=8, seq_len=32, batch_size=4)
    end_to_end = EndToEnd(refine=1, max_batches=1)
    shipped = end_to_end.run_checks(table, "+30%", PlanConfig(), model, calibration, progress=False,
                                    reference=KLReference(model, calibration, 4, 1), cache=QuantCache(model, NF4),
                                    heldback=end_to_end.heldback_reference(model, calibration, config))
    record = shipped.checks.refinement
    assert set(record.heldback_kld) == {"first plan", "refined"} and record.heldback_tokens == 4 * 32
    assert record.shipped is (record.heldback_kld["refined"] < record.heldback_kld["first plan"])


def test_the_held_back_kls_round_trip_through_plan_json():
    data = {"refinement": {"rounds": 2, "tokens": 10, "history": [], "objective_before": "fisher", "shipped": False,
                           "heldback_kld": {"first plan": 0.1, "refined": 0.2}, "heldback_tokens": 128}}
    record = Checks.from_dict(data).refinement
    assert record.heldback_kld == {"first plan": 0.1, "refined": 0.2} and record.heldback_tokens == 128
    assert Checks.from_dict(Checks(record).to_dict()).refinement == record
    old = Checks.from_dict({"refinement": {"rounds": 2, "tokens": 10, "history": [], "objective_before": "fisher"}})
    assert old.refinement.heldback_kld is None  # plan.json written before the held-back choice
