"""End-to-end planning: the quantized-context table columns, refinement rounds and the never-worse check."""

from __future__ import annotations

import pytest
from tiny import random_calibration, tiny_llama

from quantplan.analysis import INT8, NF4, analyze
from quantplan.analysis.formats import NF4_BS32
from quantplan.analysis.reference import KLReference, VariantKLs, calibration_kld
from quantplan.analysis.simulate import QuantCache
from quantplan.endtoend import EndToEnd, siblings_of
from quantplan.planner import KEEP, plan
from quantplan.planner.baselines import all_4bit, plan_keep_set
from quantplan.planner.config import PlanConfig
from quantplan.planner.plan_types import Checks
from quantplan.planner.refine import refine
from quantplan.planner.verify import choose, single_format_siblings, verify


@pytest.fixture(scope="module")
def job():
    model = tiny_llama(layers=4, hidden=128, intermediate=256)
    calibration = random_calibration(samples=8, seq_len=32)
    table = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True, context=True)
    shared = {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}
    return model, calibration, table, shared


def kld_of(table, chosen, model, shared) -> float:
    keep = plan_keep_set(table, chosen)
    return calibration_kld(shared["reference"], shared["cache"], keep.quantized)


def test_context_columns_filled_for_the_4bit_format(job):
    _, _, table, _ = job
    rows = table.for_format("nf4").set_index("name")
    measured = rows[rows["quantizable"] & (rows["group"] != "lm_head")]
    assert measured["restore_gain"].notna().all() and measured["context_output_rel_error"].gt(0).all()
    assert rows.loc["lm_head", "restore_gain"] != rows.loc["lm_head", "restore_gain"]  # NaN: kept 16-bit
    assert table.meta["context"]["all_4bit_kld"] > 0
    p = plan(table, "+30%", objective="restore")
    assert p.objective == "restore" and len(p.kept) > 1


def test_restore_objective_needs_a_context_table(job):
    model, calibration, _, _ = job
    plain = analyze(model, calibration, [NF4], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="--context"):
        plan(plain, "+30%", objective="restore")


def test_refine_spends_the_budget_in_rounds_and_beats_all_4bit(job):
    model, calibration, table, shared = job
    refined = refine(table, "+30%", model, calibration, rounds=2, **shared)
    base = plan(table, "+30%")
    assert refined.predicted.bytes <= refined.budget.bytes == base.budget.bytes
    assert refined.budget.spec == "+30%"
    history = refined.checks.refinement.history
    assert [h.round for h in history] == [1, 2] and history[1].kld_before < history[0].kld_before
    assert any(r.text.startswith("refined: kept in round 1/2") for r in refined.reasons.values())
    assert kld_of(table, refined, model, shared) < kld_of(table, plan(table, "+0%"), model, shared)
    with pytest.raises(ValueError, match="at least 1"):
        refine(table, "+30%", model, calibration, rounds=0, **shared)


def test_verify_keeps_a_plan_that_beats_all_4bit(job):
    model, calibration, table, shared = job
    chosen = plan(table, "+30%")
    checked = verify(table, chosen, model, calibration, **shared)
    record = checked.checks.verification
    assert checked.choices == chosen.choices and checked.reasons == chosen.reasons and record.chosen == "plan"
    assert chosen.checks.verification is None  # plans are frozen: verify returns a copy with its check
    assert record.calibration_kld["plan"] < record.calibration_kld["all-NF4"]
    assert not {"first+last layers @ +30%", "weight error @ +30%"} & set(record.calibration_kld)  # measured on failure


def test_verify_falls_back_when_the_plan_is_not_better(job, capsys):
    """A plan that keeps nothing extra measures exactly all-4-bit's KL: not below it, so the planner says so."""
    model, calibration, table, shared = job
    chosen = plan(table, "+0%")
    checked = verify(table, chosen, model, calibration, **shared)
    assert "is not below all-4-bit's" in capsys.readouterr().out
    record = checked.checks.verification
    assert record.chosen == "all-NF4"
    assert {"first+last layers @ +0%", "weight error @ +0%"} <= set(record.calibration_kld)  # fallbacks measured
    assert set(checked.kept) == set(all_4bit(table, "nf4").kept)
    assert all(c in (KEEP, "nf4") for c in checked.choices.values())


def test_choose_never_worse_than_all_4bit():
    assert choose({"plan": 0.1, "all": 0.2, "edges": 0.05}, ("plan",), "all") == "plan"
    assert choose({"plan": 0.3, "all": 0.2, "edges": 0.15, "weight": 0.18}, ("plan",), "all") == "edges"
    assert choose({"plan": 0.2, "all": 0.2, "edges": 0.25}, ("plan",), "all") == "all"


def test_verify_skips_a_multi_tier_plan(job, capsys):
    model, calibration, _, shared = job
    table = analyze(model, calibration, [NF4, INT8], batch_size=4, progress=False)
    chosen = plan(table, "+30%", tiers=["nf4", "int8"])
    assert verify(table, chosen, model, calibration, **shared) is chosen
    assert "skipped for a multi-tier plan" in capsys.readouterr().out and chosen.checks.verification is None


@pytest.fixture(scope="module")
def menu_job():
    model = tiny_llama(layers=4, hidden=128, intermediate=256)
    calibration = random_calibration(samples=8, seq_len=32)
    table = analyze(model, calibration, [NF4, NF4_BS32], batch_size=4, progress=False, fisher=True)
    shared = {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}
    return model, calibration, table, shared


def test_single_format_siblings_of_a_menu_plan(menu_job):
    _, _, table, _ = menu_job
    menu = plan(table, "+10%")
    siblings = siblings_of(table, PlanConfig(), menu)
    assert set(siblings) <= {"plan, nf4 only", "plan, nf4-bs32 only"} and siblings
    for label, sibling in siblings.items():
        assert sibling.used_formats == [label.split(", ")[1].removesuffix(" only")] and sibling.tiers == menu.tiers
        assert sibling.choices != menu.choices and sibling.budget == menu.budget  # the same bytes, not "+10 %" of its own tier
        assert sibling.predicted.bytes <= menu.budget.bytes
    single = plan(table, "+10%", tiers=["nf4"])
    assert single_format_siblings(table, single, lambda tiers: pytest.fail("a single-format plan has no siblings")) == {}


def test_verify_ships_the_lowest_measured_sibling(menu_job, capsys):
    model, calibration, table, shared = menu_job
    menu = plan(table, "+10%")
    siblings = {"plan, nf4-bs32 only": siblings_of(table, PlanConfig(), menu)["plan, nf4-bs32 only"]}
    real = verify(table, menu, model, calibration, siblings=siblings, **shared)
    record = real.checks.verification
    assert record.plans == ("plan", "plan, nf4-bs32 only") and set(record.plans) <= set(record.calibration_kld)
    lowest = min(record.plans, key=record.calibration_kld.get)
    assert record.chosen == lowest and record.plan_kld == record.calibration_kld[lowest]
    expected = siblings.get(lowest, menu)
    assert real.choices == expected.choices and list(real.tiers) == list(expected.tiers)

    def measure(variants):  # the sibling measures lowest, the plan above all-4-bit: the sibling still ships
        return VariantKLs({label: {"plan": 0.5, "plan, nf4-bs32 only": 0.1}.get(label, 0.3) for label in variants}, 64)

    shipped = verify(table, menu, measure=measure, siblings=siblings)
    assert shipped.checks.verification.chosen == "plan, nf4-bs32 only"
    assert shipped.choices == siblings["plan, nf4-bs32 only"].choices
    assert "nf4-bs32 only plan's KL 0.1 < the plan's 0.5" in capsys.readouterr().out
    restored = Checks.from_dict(shipped.checks.to_dict()).verification
    assert restored == shipped.checks.verification and restored.plan_kld == 0.1


def test_siblings_that_cannot_fit_are_left_out_and_a_shipped_sibling_keeps_the_menu_reference(menu_job):
    model, calibration, table, shared = menu_job
    for budget in ("+0%", "+1%"):  # below all-nf4-bs32's bytes: that sibling cannot be planned, the run goes on
        checked = EndToEnd(refine=0).run_checks(table, budget, PlanConfig(), model, calibration, **shared)
        record = checked.checks.verification
        assert "plan, nf4-bs32 only" not in record.calibration_kld and record.chosen in record.plans + (record.all_4bit,)
    menu = plan(table, "+10%")
    for sibling in siblings_of(table, PlanConfig(), menu).values():
        assert sibling.tiers == menu.tiers and sibling.quant == menu.quant and sibling.budget == menu.budget
        assert sibling.predicted.bytes_all_4bit == menu.predicted.bytes_all_4bit
        assert sibling.predicted.error_all_4bit == menu.predicted.error_all_4bit
        assert sibling.predicted.over_all_4bit == pytest.approx(sibling.predicted.bytes / menu.predicted.bytes_all_4bit - 1)
        assert len(sibling.used_formats) == 1


def test_a_nan_plan_kl_measures_the_fallbacks(menu_job):
    _, _, table, _ = menu_job
    measured = []

    def measure(variants):
        measured.extend(variants)
        return VariantKLs({label: float("nan") if label == "plan" else 0.3 if label == "all-NF4" else 0.2
                           for label in variants}, 64)

    checked = verify(table, plan(table, "+10%", tiers=["nf4"]), measure=measure)
    assert "first+last layers @ +10%" in measured and checked.checks.verification.chosen != "plan"
