"""Every benchmark script runs end to end on a tiny configuration, so a renamed API cannot break one silently.

Each script runs as its user would (``python benchmarks/x.py``, this checkout first on PYTHONPATH),
writes its JSON to a temporary ``--out`` (never benchmarks/results/), and the JSON has the keys
the README's tables are read from. The benchmarks time library functions by wrapping them at run
time; the checks below also fail when a wrapped function was renamed and its timer stayed at 0.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures import CHILD_ENV, REPO
from tiny import save_tiny_english

RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_english(tmp_path_factory.mktemp("bench") / "model", layers=2)


def run_benchmark(script: str, out, *args: str) -> dict:
    """Run benchmarks/``script`` with ``args`` and ``--out out``; return its JSON (results/ untouched)."""
    before = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*.json")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                          cwd=REPO, env={**CHILD_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("*.json")} == before
    return json.loads(out.read_text())


def test_solver(tmp_path):
    result = run_benchmark("solver.py", tmp_path / "solver.json", "--modules", "60", "--repeats", "1",
                           "--instances", "20", "--no-full-milp")
    assert {"instance", "budgets", "exactness", "meets_target_all_budgets_cpu", "machine"} <= set(result)
    assert [b["budget"] for b in result["budgets"]] == ["+5%", "+10%", "+33%", "midpoint"]
    assert result["exactness"]["mismatches"] == 0
    for row in result["budgets"]:
        assert {"solve_cpu_s_best", "stage1_items", "greedy_extra_error", "phases"} <= set(row)
        assert row["dp_calls"] >= 1 and row["phases"]["stage1_dp_s"] > 0  # the wrapped _pareto_dp was called


def test_probe_cost(tmp_path, tiny_model):
    result = run_benchmark("probe_cost.py", tmp_path / "probe.json", "--model", str(tiny_model), "--samples", "2",
                           "--seq-len", "16", "--repeats", "1", "--threads", "1")
    assert {"summary", "analyze", "forward_runs", "model", "machine"} <= set(result)
    assert {"ratio_output", "ratio_fisher", "ratio_default", "menu_extra_fisher", "hook_overhead_ratio",
            "equalize_extra", "ratio_fisher_every_window"} <= set(result["summary"])
    assert result["calibration"]["fisher_windows"] == 2  # a quarter of 2 windows, at least 8: both
    for label in ("output nf4", "output menu", "fisher nf4", "fisher menu", "default (menu + equalize)",
                  "fisher nf4, every window"):
        best = result["analyze"][label]["best"]
        # every wrapped part of analyze() was found and called
        assert best["calibration"] > 0 and best["measure"] > 0 and best["modules_measured"] > 0, label
        assert {"bnb_roundtrip", "gram_quadratic", "weight_stats", "input_stats"} <= set(best["measure_parts"])


def test_export_time(tmp_path, tiny_model):
    result = run_benchmark("export_time.py", tmp_path / "export.json", "--model", str(tiny_model),
                           "--repeats", "1")
    assert {"summary", "runs", "best", "kept", "quantized"} <= set(result)
    assert {"ratio_wall", "ratio_cpu", "target_met"} <= set(result["summary"])
    assert set(result["best"]) == {"transformers", "transformers+tokenizer", "quantplan"}
    assert {"load_quantized", "verification_reload", "model_card"} <= set(result["best"]["quantplan"]["parts"])


def test_plan_quality(tmp_path, tiny_model):
    result = run_benchmark("plan_quality.py", tmp_path / "quality.json", "--model", str(tiny_model),
                           "--samples", "2", "--seq-len", "16", "--heldout", "2", "--refine", "1",
                           "--single-module", "--single-windows", "1", "--no-cost", "--threads", "1")
    assert {"all_nf4_kld", "rows", "forward", "heldout_tokens"} <= set(result)
    scores = {row["score"] for row in result["rows"]}
    for expected in ("planner: fisher", "planner: restore", "refined (1 rounds)", "first+last layers",
                     "quantize one alone (N forwards)"):
        assert expected in scores, sorted(scores)
    assert any(s.startswith("shipped") for s in scores)
    for row in result["rows"]:
        assert {"budget", "kept", "kld", "recovery", "bytes"} <= set(row)


def test_blocksize_menu(tmp_path, tiny_model):
    result = run_benchmark("blocksize_menu.py", tmp_path / "menu.json", "--model", str(tiny_model),
                           "--samples", "2", "--seq-len", "16", "--heldout", "2", "--threads", "1", "--dtype", "fp32",
                           "--refine", "1", "--end-to-end-batches", "1")
    assert {"all_nf4_kld", "rows", "analysis", "menu_analysis_cost_over_one_format"} <= set(result)
    assert result["dtype"] == "fp32" and result["source_all_nf4_kld"] > 0  # plain NF4 of the unscaled weights
    variants = {(row["budget"], row["variant"]) for row in result["rows"]}
    for budget in ("+10%", "+33%"):
        assert {(budget, "skip-list only (nf4)"), (budget, "menu (nf4 + nf4-bs32)")} <= variants
        shipped = result["verification"][budget]
        assert (budget, f"shipped by `quantplan run` (verification chose: {shipped['chosen']})") in variants
        assert shipped["chosen"] in shipped["calibration_kld"]
        refined = result["verification"][f"{budget} --refine 1"]
        assert (budget, f"shipped by `quantplan run --refine 1` (verification chose: {refined['chosen']})") in variants
    for row in result["rows"]:
        assert {"kept", "kld", "recovery", "bytes", "over_all_nf4", "formats"} <= set(row)
    assert all("recovery_vs_source_nf4" in row for row in result["rows"])


@pytest.mark.slow  # four fresh Python processes (build + analyze at two depths): ~30 s alone, more when loaded
def test_streaming(tmp_path):
    result = run_benchmark("streaming.py", tmp_path / "streaming.json", "--shape", "tiny", "--layers", "2,3",
                           "--samples", "2", "--seq-len", "16", "--batch-size", "2")
    assert {"runs", "summary", "shape", "max_memory"} <= set(result)
    assert [r["layers"] for r in result["runs"]] == [2, 3]
    for run in result["runs"]:
        assert {"peak_rss_bytes", "rss_after_imports_bytes", "cpu_s", "block_s_mean", "rows"} <= set(run)
    assert {"target_met", "cpu_s_per_layer", "peak_rss_spread"} <= set(result["summary"])


def test_stage_profile(tmp_path, tiny_model):
    result = run_benchmark("stage_profile.py", tmp_path / "stages.json", "--model", str(tiny_model), "--label", "tiny",
                           "--samples", "2", "--seq-len", "16", "--no-fisher", "--no-compare", "--quiet")
    run = result["runs"]["tiny"]
    assert {"analysis", "plan + verification", "export"} <= set(run["top_level_s"])
    assert run["run_over_analysis"] >= 1 and run["peak_rss_bytes"] > 0 and "machine" in run
    assert run["plan_choices"] and run["scoreboard"] is None  # --no-compare: no report to read


def test_streaming_fisher(tmp_path, tiny_model):
    result = run_benchmark("streaming_fisher.py", tmp_path / "streaming_fisher.json", "--model", str(tiny_model),
                           "--samples", "4", "--seq-len", "32", "--max-memory", "1GB")
    for run in (result["in_memory"], result["streamed"]):
        assert run["cpu_s"] > 0 and run["peak_rss_bytes"] > run["rss_after_imports_bytes"] > 0
    assert result["tables"]["other_columns_equal"]
    assert result["tables"]["max_rel_difference"]["output_fisher_error"] < 1e-5
    assert {"time_ratio_cpu", "target_met"} <= set(result["summary"])


def test_gpu_check(tmp_path):
    """The GPU check script's CPU smoke run: in-memory and streamed runs agree, the export reloads, a Ctrl-C'd
    analysis resumes to the uninterrupted table."""
    result = run_benchmark("gpu_check.py", tmp_path / "gpu.json", "--device", "cpu", "--shape", "tiny", "--models",
                           "smol", "--samples", "12", "--seq-len", "16", "--no-compare")
    model = result["models"]["smol"]
    assert all(step["ok"] for step in model["steps"].values()), model["steps"]
    assert model["agreement"]["same_plan"] and model["agreement"]["other_columns_equal"]
    assert max(model["agreement"]["max_rel_difference"].values()) < 1e-4
    assert model["steps"]["reload + generate"]["linear4bit"] > 0
    resume = model["steps"]["Ctrl-C + --resume"]
    assert resume["stopped"] and 0 < resume["batches_saved"] < resume["batches"] == 3
    assert resume["same_rows"] and resume["same_tokens"] and not any(resume["finite_in_one_run_only"].values())
    assert max(resume["max_rel_difference"].values()) < 1e-6
    assert "analysis" in {s["name"] for s in model["steps"]["run in memory"]["profile"]["stages"]}


def test_streaming_run(tmp_path):
    """The whole run under --max-memory, on two tiny depths: verified, every stage profiled, peaks recorded."""
    result = run_benchmark("streaming_run.py", tmp_path / "run.json", "--shape", "tiny", "--layers", "2,3",
                           "--max-memory", "60MB", "--samples", "2", "--seq-len", "16")
    assert [r["layers"] for r in result["runs"]] == [2, 3]
    for run in result["runs"]:
        assert run["verified"] and {"analysis", "export", "compare + report"} <= set(run["stage_peaks"])
        assert run["peak_rss_bytes"] == max(run["stage_peaks"].values()) > result["imports_rss_bytes"] > 0
    assert {"within_cap_plus_1GB", "peak_growth_bytes", "deepest_over_cap"} <= set(result["summary"])


def test_broken_standin_keeps_16bit_outputs_and_breaks_4bit(tiny_model, tmp_path):
    out = tmp_path / "standin"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "broken_standin.py"), "--model", str(tiny_model),
                           "--out", str(out), "--heldout", "2", "--seq-len", "16", "--channels", "2", "--dtype", "bf16"],
                          cwd=REPO, env={**CHILD_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    record = json.loads((out / "standin.json").read_text())
    assert record["kl_16bit_original_vs_standin"] == 0.0  # powers of two: bit-identical 16-bit logits
    assert record["all_nf4_kld_standin"] > record["all_nf4_kld_original"]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert len(record["scalings"]) == 2 * 2 and all(len(s["channels"]) == 2 for s in record["scalings"])


def test_broken_model(tiny_model, tmp_path):
    result = run_benchmark("broken_model.py", tmp_path / "broken.json", "--model", str(tiny_model), "--samples", "4",
                           "--seq-len", "16", "--heldout", "2", "--refine", "1")
    entry = result["models"][tiny_model.name]
    labels = [r["score"] for r in entry["rows"]]
    for expected in ("default before", "default now", "--refine 1", "menu nf4,nf4-bs32", "menu, default now",
                     "random (seed 0)"):
        assert any(label.startswith(expected) for label in labels), (expected, labels)
    assert {"all_4bit_calibration_kld", "recovery_share", "fires"} <= set(entry["checks"]["before"])
    assert entry["source_all_nf4_kld"] > 0 and "equalized" in entry


def test_gram_update(tmp_path):
    result = run_benchmark("gram_update.py", tmp_path / "gram.json", "--tokens", "64", "--widths", "300,64",
                           "--repeats", "1")
    assert [r["width"] for r in result["rows"]] == [300, 64]
    for row in result["rows"]:
        assert row["full_s"] > 0 and row["upper_s"] > 0 and row["max_rel_difference"] < 1e-5
    assert [r["stored_share"] for r in result["rows"]] == [pytest.approx(0.693, abs=0.001), 1.0]  # 300: 3 blocks


def test_cpu_dtype(tmp_path, tiny_model):
    result = run_benchmark("cpu_dtype.py", tmp_path / "dtype.json", "--model", str(tiny_model), "--samples", "2",
                           "--seq-len", "16", "--budget", "+20%")
    assert set(result["runs"]) == {"fp32", "bf16"} and result["bf16_over_fp32_cpu"] > 0
    assert result["modules"] > 0 and -1 <= result["fisher_error_spearman"] <= 1
