"""compare + report end to end on a tiny model: scoreboard rows, files, report contents, browser rendering."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from fixtures import tiny_job

from quantplan.reports.compare import CompareConfig
from quantplan.reports.result import FILES, Comparison
from quantplan.reports.run import compare_and_report

QUICK = dict(samples=4, seq_len=64, top_k=3, random_k=3, max_new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    source, table, plans = tiny_job(folder)
    paths = compare_and_report(source, table, plans, folder / "cmp", options=CompareConfig(**QUICK))
    return {"folder": folder, "source": source, "table": table, "plans": plans, "paths": paths,
            "comparison": Comparison.load(folder / "cmp")}


def test_scoreboard_has_every_row(job):
    board = job["comparison"].scoreboard
    expected = ["16-bit", "all-INT8 (bnb 8-bit)", "all-NF4"]
    for spec in ("+10%", "+33%"):
        expected += [f"dynamic {spec}", f"first+last layers @ {spec}", f"weight error @ {spec}",
                     f"random @ {spec} (mean of 3 seeds)"]
    assert list(board["variant"]) == expected
    sixteen = board.iloc[0]
    assert sixteen["mean_kld"] == 0 and sixteen["same_top_pct"] == 100
    rest = board.iloc[1:]
    assert (rest["mean_kld"] > 0).all() and (rest["p99_kld"] >= rest["mean_kld"]).all()
    assert np.isfinite(board["ppl"]).all() and (board["tokens"] == 4 * 64).all()
    assert set(board.columns) >= {"mean_kld", "p99_kld", "same_top_pct", "ppl", "footprint_bytes", "bytes"}
    by = board.set_index("variant")
    assert by.loc["16-bit", "recovery_pct"] == 100 and by.loc["all-NF4", "recovery_pct"] == 0
    expected = 100 * (1 - by.loc["dynamic +10%", "mean_kld"] / by.loc["all-NF4", "mean_kld"])
    assert by.loc["dynamic +10%", "recovery_pct"] == pytest.approx(expected)


def test_baselines_spend_no_more_than_their_plan(job):
    board = job["comparison"].scoreboard
    for p in job["plans"]:
        dynamic = board[board["variant"] == f"dynamic {p.budget.spec}"].iloc[0]
        assert dynamic["bytes"] == p.predicted.bytes
        heuristics = board[(board["kind"] == "heuristic") & (board["plan"] == p.budget.spec)]
        assert len(heuristics) == 3 and (heuristics["bytes"] <= p.predicted.bytes).all()


def test_footprints_are_measured_for_bitsandbytes_rows(job):
    board = job["comparison"].scoreboard.set_index("variant")
    assert board.loc["all-NF4", "footprint_bytes"] < board.loc["all-INT8 (bnb 8-bit)", "footprint_bytes"]
    assert board.loc["all-INT8 (bnb 8-bit)", "footprint_bytes"] < board.loc["16-bit", "footprint_bytes"]
    plan = job["plans"][0]
    assert board.loc["dynamic +10%", "footprint_bytes"] == pytest.approx(plan.predicted.footprint_bytes, rel=0.05)


def test_simulation_tracks_bitsandbytes(job):
    check = job["comparison"].meta["simulation_check"]
    assert check["simulated_mean_kld"] == pytest.approx(check["bitsandbytes_mean_kld"], rel=0.1)
    board = job["comparison"].scoreboard.set_index("variant")
    for variant in ("all-NF4", "dynamic +10%", "dynamic +33%"):  # simulated too, for like-for-like verdicts
        assert board.loc[variant, "simulated_mean_kld"] == pytest.approx(board.loc[variant, "mean_kld"], rel=0.1)
    heuristics = board[board["kind"] == "heuristic"]
    assert (heuristics["simulated_mean_kld"] == heuristics["mean_kld"]).all()


def test_predicted_vs_measured(job):
    agreement = job["comparison"].agreement
    stats = job["comparison"].meta["agreement"]
    assert list(agreement["selected"]) == ["top"] * 3 + ["random"] * 3
    assert list(agreement["predicted_rank"][:3]) == [1, 2, 3]
    assert (agreement["measured_kld"] > -1e-7).all()  # KL >= 0 up to float rounding (fp32 on this CPU)
    assert (agreement["measured_kld"] > 1e-7).sum() >= 3  # and the top modules' errors are seen
    assert -1 <= stats["spearman"] <= 1 and stats["verdict"]


def test_generations_one_column_per_measured_variant(job):
    frame = job["comparison"].generations_frame()
    assert list(frame.columns) == ["prompt", "16-bit", "all-INT8 (bnb 8-bit)", "all-NF4", "dynamic +10%", "dynamic +33%"]
    assert len(frame) == 3 and frame.drop(columns="prompt").map(len).gt(0).all().all()


def test_files_written_and_reload(job):
    out = job["folder"] / "cmp"
    for name in FILES:
        assert (out / name).is_file(), name
    markdown = (out / "scoreboard.md").read_text()
    assert ("| Variant | Kept 16-bit | Size | Footprint | PPL | ΔPPL | Mean KLD | 99% KLD | Simulated KLD | Recovery | "
            "Same top |") in markdown
    assert re.search(r"dynamic \+10% (wins|does NOT win)", markdown)
    again = job["comparison"]
    assert list(again.scoreboard["variant"]) == list(pd.read_csv(out / "scoreboard.csv")["variant"])
    assert json.loads((out / "comparison.json").read_text())["scoreboard_columns"]["mean_kld"]


def test_markdown_report_references_existing_plots(job):
    out = job["folder"] / "cmp"
    text = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(images) == ["input_outliers.png", "layer_errors.png", "pareto.png", "weight_heatmap.png"]
    assert all((out / i).is_file() and (out / i.replace(".png", ".svg")).is_file() for i in images)
    for section in ("## Scoreboard", "## Predicted vs measured", "## Generations", "## Pareto curve",
                    "## Plan +10%", "## Plan +33%", "Spike rule", "Calibration data", "Held-out data"):
        assert section in text
    assert "lm_head" in text  # the kept modules are listed with their reasons


def test_html_report_is_self_contained(job):
    page = (job["folder"] / "cmp" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<script" not in page


def test_html_report_renders_in_headless_chromium(job, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    # A copy with a probe script: after load it records what the browser made of each image and table.
    probe = ("<script>window.addEventListener('load', () => {"
             "document.body.dataset.images = JSON.stringify([...document.images].map("
             "i => [i.complete, i.naturalWidth, i.naturalHeight]));"
             "document.body.dataset.tables = JSON.stringify([...document.querySelectorAll('table')].map("
             "t => [t.rows.length, t.rows[0].cells.length, t.rows[0].textContent, "
             "t.getBoundingClientRect().right, Math.max(...[...t.rows].map(r => r.offsetHeight))]));"
             "document.body.dataset.page = JSON.stringify([document.documentElement.scrollWidth, "
             "window.innerWidth, document.querySelectorAll('em').length]);});</script>")
    page = (job["folder"] / "cmp" / "report.html").read_text().replace("</body>", probe + "</body>")
    copy = tmp_path / "report.html"
    copy.write_text(page)
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--window-size=1366,900", "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    images = json.loads(_attribute(dom, "data-images"))
    tables = json.loads(_attribute(dom, "data-tables"))
    assert len(images) == 4 and all(done and w > 100 and h > 100 for done, w, h in images)
    headers = [t[2] for t in tables]
    scoreboard = next(t for t in tables if "Mean KLD" in t[2])
    assert scoreboard[0] == 1 + len(job["comparison"].scoreboard)
    assert any("measured_kld" in h for h in headers) and any("prompt" in h for h in headers)
    # fits a 1366 px laptop screen: no sideways scrolling, the scoreboard whole on screen, no tall rows
    scroll_width, window_width, emphasis = json.loads(_attribute(dom, "data-page"))
    assert window_width == 1366 and scroll_width <= window_width
    assert scoreboard[3] <= window_width and scoreboard[4] < 80, scoreboard
    assert emphasis >= 3  # *bitsandbytes*, *simulated*, *Simulated KLD* rendered, not shown as asterisks
    assert "*bitsandbytes*" not in dom


def _attribute(dom: str, name: str) -> str:
    import html

    found = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    assert found, f"the browser did not run the probe ({name} missing)"
    return html.unescape(found.group(1))
