"""A whole in-memory run loads the 16-bit model once and lends it to every step, which leave it unchanged."""

from __future__ import annotations

import json

import torch
from tiny import save_tiny_english

from quantplan.analysis import load_model, resolve_source
from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.equalize import apply_equalization, equalization_of
from quantplan.pipeline import run
from quantplan.reports.compare import CompareConfig, ReportDepth
from quantplan.shared_model import SharedModel


def _load_stages(profile: dict) -> list[str]:
    return [s["name"] for s in profile["stages"] if s["name"] == "load model"]


def _hand_over(monkeypatch) -> list:
    """Record the ``reuse`` each run hands its export (the analysis' packed weights, or None), and each answer it
    gives (a packed weight, or None) in ``handed[i].answers``."""
    from quantplan import pipeline

    handed, export = [], pipeline.export

    def recorded(*args, reuse=None, **kwargs):
        if reuse is not None:
            given = reuse

            def reuse(key, fmt, values):
                answer = given(key, fmt, values)
                reuse.answers.append(answer)
                return answer
            reuse.answers = []
        handed.append(reuse)
        return export(*args, reuse=reuse, **kwargs)
    monkeypatch.setattr(pipeline, "export", recorded)
    return handed


def test_a_whole_run_loads_the_16bit_model_once(tmp_path, monkeypatch):
    handed = _hand_over(monkeypatch)
    folder = save_tiny_english(tmp_path / "model", layers=2)
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False)
    compare = CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.QUICK, progress=False)
    result = run(str(folder), "+10%", tmp_path / "job", config, compare=compare)
    profile = json.loads(result["profile"].read_text())
    assert len(_load_stages(profile)) == 1  # analysis, verification and scoreboard shared one load
    assert {"analysis", "plan + verification", "export", "compare + report"} <= {
        s["name"] for s in profile["stages"] if s["depth"] == 0}
    assert len(handed) == 1 and callable(handed[0])  # the export may take the analysis' packed weights


def test_a_runs_menu_export_writes_the_analysis_packed_weights(tmp_path, monkeypatch):
    """A plan in nf4-bs32 (no BitsAndBytesConfig realises it) is written by quantplan itself: every 4-bit weight the
    export writes is the one the analysis packed, none quantized again."""
    from quantplan.planner.config import PlanConfig

    handed = _hand_over(monkeypatch)
    folder = save_tiny_english(tmp_path / "model", layers=2)
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False)
    compare = CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.QUICK, progress=False)
    result = run(str(folder), "+10%", tmp_path / "job", config, plan_config=PlanConfig(tiers=("nf4-bs32",)),
                 compare=compare)
    chosen = result["plan_obj"]
    assert chosen.mixed_blocksizes
    answers = handed[0].answers
    assert len(answers) == len(chosen.choices) - len(chosen.kept) > 0 and all(a is not None for a in answers)


def test_a_run_whose_model_is_released_before_the_export_hands_it_no_packed_weights(tmp_path, monkeypatch):
    handed = _hand_over(monkeypatch)
    folder = save_tiny_english(tmp_path / "model", layers=2)
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False)
    run(str(folder), "+10%", tmp_path / "job", config, compare=None)
    assert handed == [None]


def test_a_scoreboard_in_another_dtype_loads_its_own(tmp_path):
    folder = save_tiny_english(tmp_path / "model", layers=2)
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False)
    compare = CompareConfig(samples=2, seq_len=32, dtype="bf16", report=ReportDepth.QUICK, progress=False,
                            baselines=False)
    result = run(str(folder), "+10%", tmp_path / "job", config, compare=compare)
    assert len(_load_stages(json.loads(result["profile"].read_text()))) == 2


def test_the_steps_leave_the_borrowed_weights_as_they_were(tmp_path):
    """Analysis (Fisher), verification and scoreboard on one shared model: its weights and requires_grad
    equal a fresh load's afterwards, scaled as the table's channel scales say (the scoreboard undoes them for its
    source-weights row and puts them back)."""
    from quantplan.endtoend import EndToEnd
    from quantplan.pipeline import analyze_model
    from quantplan.planner.config import PlanConfig
    from quantplan.reports.compare import compare as compare_variants

    folder = save_tiny_english(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False)
    shared = SharedModel(source, "fp32", "cpu")
    table = analyze_model(source, tmp_path / "job", config, shared=shared)
    chosen = EndToEnd().plan(source, config, table, "+10%", PlanConfig(), shared=shared)
    compare_variants(source, [chosen], table=table, model16=shared.get(),
                     options=CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.QUICK,
                                           progress=False))
    assert shared.loads == 1
    fresh = load_model(source, dtype=torch.float32)
    equalization = equalization_of(table.meta)
    assert equalization  # the analysis scaled the borrowed model in place, once: the other steps leave it so
    apply_equalization(fresh, equalization)
    borrowed = shared.get()
    for (name, a), (_, b) in zip(borrowed.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [p.requires_grad for p in borrowed.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert all(p.grad is None for p in borrowed.parameters())


def test_each_weight_is_quantized_once_per_format_across_the_steps(tmp_path, monkeypatch):
    """The analysis' packed 4-bit weights (SharedModel.packed) serve the verification and the scoreboard: no
    (weight, format) is quantized twice, and every one the later steps simulate was made by the analysis."""
    from quantplan.analysis.formats import FourBit
    from quantplan.endtoend import EndToEnd
    from quantplan.pipeline import analyze_model
    from quantplan.planner.config import PlanConfig
    from quantplan.reports.compare import compare as compare_variants

    made, quantize = [], FourBit.quantize

    def counted(fmt, weight):
        made.append((fmt, weight.data_ptr()))
        return quantize(fmt, weight)

    monkeypatch.setattr(FourBit, "quantize", counted)
    folder = save_tiny_english(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    # without channel scales: with them the scoreboard's source-weights row quantizes the unscaled weights once more
    config = AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False, equalize=False)
    shared = SharedModel(source, "fp32", "cpu")
    table = analyze_model(source, tmp_path / "job", config, shared=shared)
    analyzed = len(made)
    assert len(shared.packed) == analyzed  # every candidate in both menu formats, kept
    chosen = EndToEnd().plan(source, config, table, "+10%", PlanConfig(), shared=shared)
    compare_variants(source, [chosen], table=table, model16=shared.get(), packed=shared.packed,
                     options=CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.QUICK,
                                           progress=False))
    assert len(made) == len(set(made)) == analyzed > 0  # the verification and the scoreboard quantized nothing again
    assert len(shared.packed) == 0  # emptied once the scoreboard's simulations were done


def test_a_device_override_chooses_the_scoreboard_dtype_again(monkeypatch):
    """CompareConfig resolves dtype "auto" for its device when built; moving it to another device re-resolves."""
    import quantplan.reports.run as report_run
    from quantplan.analysis.models import resolve_dtype

    seen = {}

    class Captured(Exception):
        pass

    def fake_compare(model, plans, out_dir, *, table, options, model16, checkpoint=None, packed=None):
        seen["options"] = options
        raise Captured

    monkeypatch.setattr(report_run, "compare", fake_compare)
    cpu = CompareConfig()
    assert cpu.dtype == resolve_dtype("auto", "cpu")
    try:
        report_run.compare_and_report(None, object.__new__(report_run.SensitivityTable), [], "unused", options=cpu,
                                      device="cuda")
    except Captured:
        pass
    assert seen["options"].dtype == "bf16" and seen["options"].device == "cuda"
