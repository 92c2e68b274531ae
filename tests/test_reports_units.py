"""Pieces of the comparison and report without a full run: math, baselines, simulation, plots, verdicts, CLI."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import tiny_job

from quantplan.analysis import NF4, load_model
from quantplan.analysis.simulate import QuantCache
from quantplan.planner.baselines import all_4bit, baseline_keep_sets, edge_order, linear_frame, plan_keep_set
from quantplan.reports import plots
from quantplan.reports.fidelity import Fidelity, fidelity_of_self, heldout_reference, measure
from quantplan.reports.scoreboard import scoreboard_frame, to_markdown, verdicts
from quantplan.reports.tables import html_table, markdown_table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    source, table, plans = tiny_job(tmp_path_factory.mktemp("units"))
    return source, table, plans


def test_kld_matches_torch_definition():
    torch.manual_seed(0)
    ids = torch.randint(0, 8, (2, 5))
    ref_logits, var_logits = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.logits[: len(input_ids)]})()

    reference = heldout_reference(Fixed(ref_logits), ids, batch_size=2)
    result = measure(Fixed(var_logits), reference)
    p, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(var_logits, -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(result.kld, expected.flatten().numpy(), rtol=1e-5, atol=1e-7)
    nll = -q[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
    assert result.summary()["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert fidelity_of_self(reference).summary()["mean_kld"] == 0


def test_fidelity_summary_error_bars():
    f = Fidelity(np.array([0.0, 0.2, 0.4, 0.2]), np.array([True, True, False, True]), np.log(np.array([2.0, 2.0, 2.0])))
    s = f.summary()
    assert s["mean_kld"] == pytest.approx(0.2) and s["same_top_pct"] == pytest.approx(75)
    assert s["ppl"] == pytest.approx(2.0) and s["ppl_se"] == pytest.approx(0.0)
    assert s["mean_kld_se"] == pytest.approx(np.std([0, 0.2, 0.4, 0.2], ddof=1) / 2)


def test_quant_cache_swaps_and_restores(tiny):
    source, table, _ = tiny
    model = load_model(source)
    name = "model.layers.0.mlp.down_proj"
    module = dict(model.named_modules())[name]
    original = module.weight.data.clone()
    cache = QuantCache(model, NF4)
    with cache.quantized([name]):
        assert torch.equal(module.weight.data, NF4.roundtrip(original)[0])
        with pytest.raises(RuntimeError, match="boom"):
            with cache.quantized(["model.layers.1.mlp.up_proj"]):
                raise RuntimeError("boom")
    assert torch.equal(module.weight.data, original)
    assert torch.equal(dict(model.named_modules())["model.layers.1.mlp.up_proj"].weight.data,
                       load_model(source).model.layers[1].mlp.up_proj.weight.data)


def test_baselines_fill_the_plan_bytes_greedily(tiny):
    _, table, plans = tiny
    frame = linear_frame(table, "nf4")
    for p in plans:
        assert plan_keep_set(table, p).bytes == p.predicted.bytes
        sets = baseline_keep_sets(table, p, seeds=(0, 1))
        assert [s.label for s in sets] == [f"{h} @ {p.budget.spec}" for h in
                                           ("first+last layers", "weight error", "random", "random")]
        for s in sets:
            assert s.bytes <= p.predicted.bytes
            assert "lm_head" in s.kept and not (s.kept & s.quantized)
            room = p.predicted.bytes - s.bytes
            extra = (frame["bytes_16bit"] - frame["bytes"])[list(s.quantized)]
            assert (extra > room).all(), "a module that still fits was left quantized"
        assert sets[2].kept != sets[3].kept  # seeds differ


def test_first_last_order_starts_at_both_ends(tiny):
    _, table, _ = tiny
    frame = linear_frame(table, "nf4")
    order = edge_order(frame[frame["group"] == "language_model"])
    layers = [int(frame.loc[n, "layer"]) for n in order]
    assert set(layers[:14]) == {0, 3} and set(layers[14:]) == {1, 2}


def test_all_4bit_keeps_lm_head_only(tiny):
    _, table, plans = tiny
    uniform = all_4bit(table, "nf4")
    assert uniform.kept == {"lm_head"}
    assert uniform.bytes == plans[0].predicted.bytes_all_4bit


def _board(dynamic_kld, heuristic_klds):
    rows = [{"variant": "16-bit", "kind": "reference", "plan": "", "mean_kld": 0.0, "mean_kld_se": 0.0}]
    rows.append({"variant": "dynamic +10%", "kind": "dynamic", "plan": "+10%", "mean_kld": dynamic_kld,
                 "mean_kld_se": 1e-4})
    for i, kld in enumerate(heuristic_klds):
        rows.append({"variant": f"h{i} @ +10%", "kind": "heuristic", "plan": "+10%", "mean_kld": kld,
                     "mean_kld_se": 1e-4})
    return scoreboard_frame(rows)


def test_verdict_says_so_when_the_plan_loses():
    (line,) = verdicts(_board(0.05, [0.04, 0.09]))
    assert "does NOT win" in line and "h0 @ +10%" in line and "h1" not in line


def test_verdict_on_a_win_and_a_close_call():
    (win,) = verdicts(_board(0.01, [0.04, 0.09]))
    assert win.startswith("dynamic +10% wins") and "not a clear win" not in win
    (close,) = verdicts(_board(0.0400, [0.0401]))
    assert "not a clear win" in close


def test_verdict_compares_like_for_like():
    board = _board(0.050, [0.049])  # bitsandbytes-measured plan vs a simulated heuristic: looks like a loss
    board.loc[board["kind"] == "dynamic", "simulated_mean_kld"] = 0.045
    board.loc[board["kind"] == "heuristic", "simulated_mean_kld"] = 0.049
    (line,) = verdicts(board)
    assert line.startswith("dynamic +10% wins: mean KLD 0.045000") and "both simulated" in line


def test_random_seeds_fold_into_their_mean():
    rows = [{"variant": "random @ +10%", "kind": "heuristic", "plan": "+10%", "seed": s, "mean_kld": k,
             "bytes": 100 + s, "footprint_bytes": 90, "kept_16bit": 3, "ppl": 10.0}
            for s, k in [(0, 0.1), (1, 0.2), (2, 0.3)]]
    board = scoreboard_frame(rows)
    assert len(board) == 1 and board["mean_kld"][0] == pytest.approx(0.2)
    assert board["variant"][0] == "random @ +10% (mean of 3 seeds)" and "seed 2: 0.300000" in board["note"][0]
    # the note is a footnote under the table, not a column that widens it
    text = to_markdown(board)
    assert "Note" not in text.splitlines()[0] and "| random @ +10% (mean of 3 seeds) [1] |" in text
    assert text.splitlines()[-1].startswith("[1] mean KLD per seed: seed 0: 0.100000")


def test_report_inline_markdown_renders_emphasis_and_code():
    from quantplan.reports.report import _inline

    assert _inline("*bitsandbytes* rows, `a*b*c`, 2 * 3 * 4") == \
        "<em>bitsandbytes</em> rows, <code>a*b*c</code>, 2 * 3 * 4"
    assert html_table(pd.DataFrame({"n": ["1.5 ± 0.2"]}), numeric=("n",)).count('<span class="se">± 0.2</span>') == 1


def test_tables_escape():
    frame = pd.DataFrame({"a": ["x|y", "<b>"], "n": [1.5, np.nan]})
    assert markdown_table(frame, {"n": "right"}).splitlines()[2] == "| x\\|y | 1.5 |"
    assert "&lt;b&gt;" in html_table(frame) and '<td class="num">' in html_table(frame, numeric=("n",))


def test_plots_return_figures_and_mark_a_planted_spike(tiny, tmp_path):
    _, table, plans = tiny
    planted = table.df.copy()
    target = "model.layers.2.mlp.down_proj"
    planted.loc[planted["name"] == target, "output_rel_error"] *= 1000
    spiky = type(table)(planted, table.meta)
    assert target in list(plots.spike_table(spiky)["name"])
    fig = plots.plot_layer_errors(spiky)
    rings = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert len(rings) == 1 and len(rings[0].get_offsets()) >= 1
    pareto = pd.DataFrame({"bytes": [1e5, 2e5], "error": [1.0, 0.0]})
    board = pd.DataFrame({"variant": ["all-NF4"], "kind": ["uniform"], "bytes": [1e5], "mean_kld": [0.1]})
    for fig in (plots.plot_weight_heatmap(table), plots.plot_input_outliers(table),
                plots.plot_pareto(pareto, board, plans)):
        assert fig.axes
    paths = plots.save_figure(fig, tmp_path, "pareto")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths["svg"].read_bytes()[:500]


def test_pareto_plot_keeps_points_and_labels_inside(tiny):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _, _, plans = tiny
    top = max(p.predicted.bytes for p in plans) * 1.5
    pareto = pd.DataFrame({"bytes": [top / 2, top * 0.75, top], "error": [1.0, 0.2, 0.0]})
    board = pd.DataFrame({"variant": ["16-bit", "all-NF4", "random @ +10% (mean of 3 seeds)", "all-INT8 (bnb 8-bit)"],
                          "kind": ["reference", "uniform", "heuristic", "uniform"],
                          "bytes": [top, top / 2, top * 0.6, top * 0.9], "mean_kld": [0.0, 0.3, 0.2, 0.01]})
    fig = plots.plot_pareto(pareto, board, plans)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_window_extent()
        for text in ax.texts:  # the point labels ("16-bit" at the far right and bottom included)
            extent = text.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
            assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()
        for points in ax.collections:  # every marker whole inside the frame
            radius = np.sqrt(points.get_sizes().max()) / 2 * fig.dpi / 72
            for x, y in points.get_offset_transform().transform(points.get_offsets()):
                assert box.x0 + radius <= x <= box.x1 - radius and box.y0 + radius <= y <= box.y1 - radius


def test_compare_cli_arguments_map_to_options(monkeypatch, tmp_path):
    from quantplan import compare_cli as cli

    seen = {}
    monkeypatch.setattr("quantplan.reports.run.compare_and_report", lambda *a, **k: seen.update(args=a, kwargs=k))
    parser = argparse.ArgumentParser()
    cli.add_compare_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", "some/model", "--plan", str(tmp_path / "plan.json"), "--plan", "b.json",
                              "--out", "o", "--heldout-samples", "3", "--top-k", "2", "--no-baselines",
                              "--gen-prompt", "Hi", "--quiet"])
    assert args.handler(args) == 0
    model, table, plans, out = seen["args"]
    options = seen["kwargs"]["options"]
    assert (model, table, plans, out) == ("some/model", tmp_path, [str(tmp_path / "plan.json"), "b.json"], "o")
    assert (options.samples, options.top_k, options.baselines, options.prompts, options.progress) == (
        3, 2, False, ("Hi",), False)


def test_a_variant_that_fails_to_load_becomes_a_row(tiny, monkeypatch):
    from quantplan.planner.baselines import KeepSet
    from quantplan.reports import compare as compare_module
    from quantplan.reports.compare import CompareConfig

    source, _, _ = tiny

    def no_int8(*args, **kwargs):
        raise RuntimeError("no 8-bit kernel for this device")

    monkeypatch.setattr(compare_module, "load_quantized_from", no_int8)  # from the 16-bit model in memory
    monkeypatch.setattr(compare_module, "load_model", no_int8)  # or from the files
    keep = KeepSet("all-INT8 (bnb 8-bit)", "uniform", frozenset(), frozenset(), 1000, 900)
    row, answers = compare_module._measure_bnb(source, None, keep, None, None, None, CompareConfig(prompts=("Hi",)))
    assert "bitsandbytes failed on cpu: RuntimeError: no 8-bit kernel" in row["note"]
    assert "mean_kld" not in row and answers == {"Hi": "(not run: variant failed)"}
    board = scoreboard_frame([row])
    assert np.isnan(board["mean_kld"][0]) and "n/a" in to_markdown(board)


def test_a_bitsandbytes_row_loads_from_the_16bit_model_in_memory(tiny, monkeypatch):
    """The all-INT8 row is measured without reading the checkpoint files again (they are not loaded at all here)."""
    from transformers import BitsAndBytesConfig

    from quantplan.analysis import load_model
    from quantplan.planner.baselines import KeepSet
    from quantplan.reports import compare as compare_module
    from quantplan.reports.compare import CompareConfig
    from quantplan.reports.fidelity import heldout_reference

    source, _, _ = tiny
    model16 = load_model(source)

    def no_files(*args, **kwargs):
        raise AssertionError("the files were read again")

    monkeypatch.setattr(compare_module, "load_model", no_files)
    reference = heldout_reference(model16, torch.randint(3, 40, (2, 16)), batch_size=2)
    keep = KeepSet("all-INT8 (bnb 8-bit)", "uniform", frozenset(), frozenset(), 1000, 900)
    row, _ = compare_module._measure_bnb(source, model16, keep, BitsAndBytesConfig(load_in_8bit=True), reference,
                                         None, CompareConfig(report=compare_module.ReportDepth.QUICK))
    assert row["note"] == "" and 0 < row["mean_kld"] < 1


def test_heldout_text_must_not_be_the_calibration_text(tiny):
    from quantplan.analysis import load_processor
    from quantplan.reports.compare import CompareConfig, _heldout

    source, table, _ = tiny
    with pytest.raises(ValueError, match="disjoint"):
        _heldout(source, load_processor(source), table, CompareConfig(heldout="default"))
    assert _heldout(source, load_processor(source), table, CompareConfig(samples=2, seq_len=16)).source == "heldout"
