"""The per-module NF4 blocksize menu: formats, round-trip guard, planning, verification, pre-quantized export."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from tiny import random_calibration, save_tiny
from transformers import AutoModelForCausalLM

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.formats import NF4_BS32, FourBit, parse_formats
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache
from quantplan.planner import KEEP, ExportError, export, plan
from quantplan.planner.baselines import plan_keep_set
from quantplan.planner.config import PlanConfig
from quantplan.planner.pareto import pareto_curve
from quantplan.planner.refine import refine
from quantplan.planner.verify import verify

MENU = [NF4, NF4_BS32]


@pytest.fixture(scope="module")
def menu_job(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("menu"), layers=3)
    source = resolve_source(str(folder))
    model = load_model(source)
    calibration = random_calibration()
    table = analyze(model, calibration, MENU, progress=False, fisher=True, model_fingerprint=source.fingerprint,
                    model_id=str(folder))
    return source, model, calibration, table


def mixed_plan(table, **kwargs):
    """A plan at a budget where the knapsack mixes both blocksizes (and so needs the pre-quantized writer)."""
    for budget in ("+1%", "+2%", "+3%", "+5%", "+8%"):
        p = plan(table, budget, **kwargs)
        if p.mixed_blocksizes:
            return p
    raise AssertionError("no budget gave a mixed-blocksize plan")


def test_format_names_carry_the_blocksize():
    assert [f.name for f in parse_formats("nf4,nf4-bs32,int8")] == ["nf4", "nf4-bs32", "int8"]
    assert parse_formats("fp4-bs128")[0] == FourBit("fp4", blocksize=128)
    assert parse_formats("nf4", blocksize=32)[0].name == "nf4-bs32"
    with pytest.raises(ValueError, match="listed twice"):
        parse_formats("nf4,nf4-bs64")
    with pytest.raises(ValueError, match="blocksize 48"):
        parse_formats("nf4-bs48")


def test_the_default_formats_are_the_menu_unless_the_blocksize_or_double_quant_rule_it_out():
    from quantplan import AnalyzeConfig

    def names(**kwargs):
        return [f.name for f in AnalyzeConfig(**kwargs).format_values()]

    assert names() == ["nf4", "nf4-bs32"]
    assert names(formats="nf4") == ["nf4"]  # skip-list-only mode
    assert names(blocksize=32) == ["nf4-bs32"]  # not "listed twice"
    assert len(names(double_quant=False)) == 1  # the menu is written with double quant
    assert names(max_memory="1GB") == ["nf4", "nf4-bs32"]  # streamed: the menu's export streams too
    assert names(max_memory="auto") == ["nf4", "nf4-bs32"]
    assert names(context=True) == ["nf4"]  # restore gains are measured for one format


def test_menu_table_measures_both_formats_from_one_pass(menu_job):
    _, _, _, table = menu_job
    assert table.formats == ["nf4", "nf4-bs32"]
    rows = {f: table.for_format(f).set_index("name") for f in table.formats}
    quantizable = rows["nf4"]["quantizable"]
    for fmt in (NF4, NF4_BS32):  # bytes per format at its own blocksize, as the byte model predicts them
        part = rows[fmt.name][quantizable]
        assert part["supported"].all()
        predicted = [fmt.storage_bytes((int(r.out_features), int(r.in_features))) for r in part.itertuples()]
        assert part["bytes"].tolist() == pytest.approx(predicted, abs=8)
    assert (rows["nf4-bs32"].loc[quantizable, "bytes"] > rows["nf4"].loc[quantizable, "bytes"]).all()
    assert (rows["nf4-bs32"].loc[quantizable, "weight_rel_error"]
            < rows["nf4"].loc[quantizable, "weight_rel_error"]).all()
    assert rows["nf4-bs32"].loc[quantizable, "output_fisher_error"].notna().all()


def test_guard_drops_an_implausible_round_trip(menu_job, monkeypatch):
    _, model, calibration, _ = menu_job
    honest = FourBit.roundtrip

    def broken(self, weight):  # bitsandbytes' CPU bug at some shapes: a wildly wrong round trip
        restored, nbytes = honest(self, weight)
        return (restored * 0 if self.blocksize == 32 else restored), nbytes

    monkeypatch.setattr(FourBit, "roundtrip", broken)
    table = analyze(model, calibration, MENU, progress=False)
    bs32 = table.for_format("nf4-bs32")
    candidates = bs32[bs32["quantizable"]]
    assert not candidates["supported"].any()
    assert candidates["unsupported_reason"].str.contains("implausible").all()
    assert table.for_format("nf4").loc[lambda d: d["quantizable"], "supported"].all()
    p = plan(table, "+10%")
    assert "nf4-bs32" not in p.choices.values() and "nf4" in p.choices.values()


def test_default_tiers_are_the_menu_with_blocksize_64_as_reference(menu_job):
    _, _, _, table = menu_job
    p = mixed_plan(table)
    assert p.tiers == ["nf4", "nf4-bs32"] and p.quant["blocksize"] == 64
    assert p.predicted.bytes_all_4bit == plan(table, "+0%", tiers=["nf4"]).predicted.bytes_all_4bit
    assert p.predicted.bytes <= p.budget.bytes
    assert p.formats["nf4-bs32"]["blocksize"] == 32
    assert "per-module blocksizes" in p.bnb_config_code()
    curve = pareto_curve(table, points=5)
    assert curve["in:nf4-bs32"].max() > 0
    single = plan(table, "+10%", tiers=["nf4"])
    assert not single.mixed_blocksizes and "per-module" not in single.bnb_config_code()


def test_menu_plan_is_shown_beside_skip_list_only_at_equal_bytes(menu_job, tmp_path):
    from dataclasses import replace

    from quantplan.planner.compat import loader_compat, skip_list_sentence
    from quantplan.planner.modelcard import compat_text
    from quantplan.planner.plan_types import Plan
    from quantplan.reports.report import _compat_blocks, to_markdown

    _, _, _, table = menu_job
    config = PlanConfig()
    p = mixed_plan(table)
    p = replace(p, compat=loader_compat(table, p, config))
    alt = p.compat.skip_list_only
    single = plan(table, p.budget.bytes, tiers=["nf4"])
    assert (alt.tier, alt.bytes, alt.error, alt.kept) == ("nf4", single.predicted.bytes, single.predicted.error,
                                                          len(single.kept))
    assert alt.bytes <= p.budget.bytes and p.predicted.error <= alt.error * (1 + 1e-9)
    line = skip_list_sentence(p)
    assert "Skip-list-only mode at the same bytes" in line and "`--formats nf4`" in line and f"{alt.error:.4g}" in line
    assert line in to_markdown(_compat_blocks(p)) and line in compat_text(p)
    assert Plan.load(p.save(tmp_path / "plan.json")) == p
    one = plan(table, "+10%", tiers=["nf4"])
    one = replace(one, compat=loader_compat(table, one, config))
    assert one.compat.skip_list_only is None and skip_list_sentence(one) == ""


def test_verification_simulates_each_module_in_its_planned_format(menu_job):
    _, model, calibration, table = menu_job
    p = mixed_plan(table)
    keep = plan_keep_set(table, p)
    assert keep.mixed_formats and {f.blocksize for f in keep.formats.values()} == {32, 64}
    assert all(keep.formats[n].name == c for n, c in p.choices.items() if c != KEEP)
    assert keep.bytes == p.predicted.bytes
    shared = {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}
    checked = verify(table, p, model, calibration, **shared)
    kld = checked.checks.verification.calibration_kld
    assert "plan" in kld and all(v == v for v in kld.values())


def test_refinement_plans_over_the_menu_explicit_or_default(menu_job, capsys):
    _, model, calibration, table = menu_job
    shared = {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}
    refined = refine(table, "+20%", model, calibration, rounds=1, **shared)
    assert refined.tiers == ["nf4", "nf4-bs32"] and "using nf4 only" not in capsys.readouterr().out
    explicit = refine(table, "+20%", model, calibration, config=PlanConfig(tiers=("nf4", "nf4-bs32")), rounds=1,
                      **shared)
    assert explicit.choices == refined.choices and explicit.predicted.bytes <= explicit.budget.bytes


def test_mixed_blocksize_plan_exports_and_reloads_with_plain_from_pretrained(menu_job, tmp_path):
    source, _, _, table = menu_job
    p = mixed_plan(table)
    result = export(source, p, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    modules = dict(reloaded.named_modules())
    for name, choice in p.choices.items():
        if choice == KEEP:
            assert type(modules[name]) is torch.nn.Linear
        else:
            assert type(modules[name]).__name__ == "Linear4bit"
            assert modules[name].weight.quant_state.blocksize == p.formats[choice]["blocksize"]
    assert {modules[n].weight.quant_state.blocksize for n, c in p.choices.items() if c != KEEP} == {32, 64}
    logits = reloaded(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    assert result.footprint_bytes == reloaded.get_memory_footprint()
    assert result.footprint_bytes == pytest.approx(p.predicted.footprint_bytes, rel=0.01)
    assert result.checkpoint_bytes == pytest.approx(p.predicted.bytes, rel=0.01)
    saved = json.loads((tmp_path / "out" / "quantplan_plan.json").read_text())
    assert saved["choices"] == p.choices and saved["formats"]["nf4-bs32"]["blocksize"] == 32
    card = (tmp_path / "out" / "README.md").read_text()
    assert "transformers >= 5" in card and "vLLM" in card and "nf4-bs32" in card
    assert not list(tmp_path.glob(".out.partial-*"))  # atomic: the staging folder was renamed into place


def test_a_menu_plan_with_every_4bit_module_at_blocksize_32_is_measured_and_exported_at_32(menu_job, tmp_path):
    # bug: such a plan (one 4-bit format, not the reference) was measured and exported at blocksize 64
    source, _, _, table = menu_job
    p = next(q for q in (plan(table, b) for b in ("+8%", "+15%", "+20%", "+30%")) if q.used_formats == ["nf4-bs32"])
    assert p.tiers == ["nf4", "nf4-bs32"] and p.mixed_blocksizes and "per-module" in p.bnb_config_code()
    keep = plan_keep_set(table, p)
    assert {f.blocksize for f in keep.formats.values()} == {32} and keep.bytes == p.predicted.bytes
    assert keep.mixed_formats  # compare simulates it: a BitsAndBytesConfig load would be blocksize 64
    export(source, p, tmp_path / "out")  # checks each module's loaded blocksize against the plan
    modules = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").named_modules())
    assert {modules[n].weight.quant_state.blocksize for n, c in p.choices.items() if c != KEEP} == {32}


def test_single_blocksize_plan_keeps_the_transformers_path(menu_job, tmp_path, monkeypatch):
    source, _, _, table = menu_job
    export_module = importlib.import_module("quantplan.planner.export")

    def no_writer(*args, **kwargs):
        raise AssertionError("a single-format plan must not use the pre-quantized writer")

    monkeypatch.setattr(export_module, "write_prequantized", no_writer)
    monkeypatch.setattr(export_module, "write_streamed", no_writer)
    p = plan(table, "+10%", tiers=["nf4"])
    export(source, p, tmp_path / "single")
    config = json.loads((tmp_path / "single" / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == p.skip_modules


def test_a_menu_plan_with_an_8bit_tier_is_refused_before_loading(menu_job, tmp_path):
    source, _, _, table = menu_job
    p = mixed_plan(table)
    bad = p.__class__(**{**p.__dict__, "choices": {**p.choices, next(iter(p.choices)): "int8"},
                         "formats": {**p.formats, "int8": {"name": "int8", "bits": 8}}})
    with pytest.raises(ExportError, match="4-bit formats"):
        export(source, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_run_with_the_menu_verifies_and_exports_a_mixed_plan(tmp_path):
    from quantplan import AnalyzeConfig, EndToEnd, run

    folder = save_tiny(tmp_path / "model", layers=3)
    config = AnalyzeConfig(formats="nf4,nf4-bs32", samples=4, seq_len=32, progress=False)
    out = run(str(folder), "+2%", tmp_path / "out", config, end_to_end=EndToEnd(refine=0))
    chosen = out["plan_obj"]
    record = chosen.checks.verification
    assert record is not None and record.chosen in record.plans  # the menu plan or a single-format sibling
    assert chosen.tiers == ["nf4", "nf4-bs32"]  # a shipped sibling keeps the menu's tiers and reference
    if record.chosen == "plan":
        assert chosen.mixed_blocksizes
    else:
        assert chosen.used_formats == [record.chosen.removeprefix("plan, ").removesuffix(" only")]
    assert out["export"].checkpoint_bytes == pytest.approx(chosen.predicted.bytes, rel=0.01)


def test_run_refines_a_menu_plan_automatically_and_exports_it(tmp_path):
    """The automatic refinement (forced to fire) plans over the menu; what ships is verified and exported
    module by module in its planned blocksize."""
    from quantplan import AnalyzeConfig, EndToEnd, run
    from quantplan.planner.auto_refine import AutoRefine

    folder = save_tiny(tmp_path / "model", layers=3)
    config = AnalyzeConfig(formats="nf4,nf4-bs32", samples=4, seq_len=32, progress=False)
    out = run(str(folder), "+5%", tmp_path / "out", config,
              end_to_end=EndToEnd(auto=AutoRefine(rounds=2, max_all_4bit_kld=0.0)))
    chosen = out["plan_obj"]
    record = chosen.checks.refinement
    assert record is not None and len(record.history) == 2 and chosen.checks.verification is not None
    assert chosen.tiers == ["nf4", "nf4-bs32"] and chosen.predicted.bytes <= chosen.budget.bytes
    modules = dict(AutoModelForCausalLM.from_pretrained(out["export"].path, device_map="cpu").named_modules())
    for name, choice in chosen.choices.items():
        if choice != KEEP:
            assert modules[name].weight.quant_state.blocksize == chosen.formats[choice]["blocksize"]
    assert out["export"].checkpoint_bytes == pytest.approx(chosen.predicted.bytes, rel=0.01)
