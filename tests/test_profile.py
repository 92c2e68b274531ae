"""The stage profile (quantplan.common.profile) and what `quantplan run` writes with it; --report quick."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import time

import pandas as pd
import pytest
from tiny import save_tiny_english

from quantplan import AnalyzeConfig, run
from quantplan.common.profile import PROFILE_FILE, recording, stage
from quantplan.reports.compare import QUICK_SKIPS, CompareConfig, ReportDepth


def test_stages_nest_in_start_order_with_their_own_peaks():
    with stage("outside"):  # no recording: nothing to record, nothing fails
        pass
    with recording() as profile:
        with stage("outer"):
            with stage("inner"):
                buffer = bytearray(200 * 2**20)  # 200 MB touched inside the inner stage
                buffer[:: 4096] = b"x" * len(buffer[:: 4096])
                del buffer
            with stage("second"):
                pass
    assert [(s.name, s.depth) for s in profile.stages] == [("outer", 0), ("inner", 1), ("second", 1)]
    outer, inner, second = profile.stages
    assert all(s.seconds >= 0 for s in profile.stages) and outer.seconds >= inner.seconds + second.seconds
    assert outer.peak_rss_bytes >= inner.peak_rss_bytes >= 200 * 2**20
    if profile.rss_scope == "stage":  # Linux: the mark is reset per stage
        assert second.peak_rss_bytes < inner.peak_rss_bytes - 100 * 2**20
    if inner.peak_anon_bytes is not None:  # Linux: the sampled anonymous peak, also per stage
        assert outer.peak_anon_bytes >= inner.peak_anon_bytes >= 200 * 2**20
        assert second.peak_anon_bytes < inner.peak_anon_bytes - 100 * 2**20
    assert len(profile.lines()) == 3 and profile.to_dict()["total_seconds"] == outer.seconds


def test_file_pages_read_through_mmap_count_in_rss_but_not_in_the_anonymous_peak(tmp_path):
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.truncate(200 * 2**20)
    with recording() as profile:
        with stage("touch"):
            buffer = bytearray(100 * 2**20)  # anonymous, while the sampler runs
            buffer[:: 4096] = b"x" * len(buffer[:: 4096])
            time.sleep(0.1)
            del buffer
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 0  # every page read
    touched = profile.stages[0]
    if touched.peak_anon_bytes is None:
        pytest.skip("no RssAnon in /proc/self/status on this system")
    assert touched.peak_anon_bytes >= 100 * 2**20
    assert touched.peak_rss_bytes >= touched.peak_anon_bytes + 150 * 2**20  # the file's 200 MB counted in RSS
    assert "anonymous" in profile.lines()[0] and profile.to_dict()["stages"][0]["peak_anon_bytes"] > 0


def test_config_reads_the_report_depth_by_name():
    assert CompareConfig(report="quick").report is ReportDepth.QUICK
    assert CompareConfig(report="quick").seed_values == (0,) and CompareConfig().seed_values == (0, 1, 2)
    with pytest.raises(ValueError):
        CompareConfig(report="medium")


def test_a_tiny_run_writes_its_stage_profile_and_a_quick_report(tmp_path, capsys):
    model = save_tiny_english(tmp_path / "model", layers=2)
    config = AnalyzeConfig(samples=4, seq_len=32, batch_size=2, fisher=False, progress=False)
    compare = CompareConfig(samples=2, seq_len=32, max_new_tokens=4, progress=False, report="quick")
    out = run(str(model), "+20%", tmp_path / "job", config, compare=compare)
    profile = json.loads((tmp_path / "job" / PROFILE_FILE).read_text())
    assert out["profile"] == tmp_path / "job" / PROFILE_FILE
    names = [s["name"] for s in profile["stages"]]
    for expected in ("analysis", "load model", "calibration pass", "measure", "plan + verification", "export",
                     "compare + report", "compare", "simulated variants", "write report"):
        assert expected in names, (expected, names)
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in profile["stages"])
    assert [s["name"] for s in profile["stages"] if s["depth"] == 0] == [
        "analysis", "plan + verification", "export", "compare + report"]
    assert "stage profile" in capsys.readouterr().out
    # quick: the scoreboard with recovery and baselines (one random seed), no agreement, no generations
    board = pd.read_csv(tmp_path / "job" / "scoreboard.csv")
    assert {"first+last layers @ +20%", "weight error @ +20%", "random @ +20% (1 seed)"} <= set(board["variant"])
    assert board["recovery_pct"].notna().any()
    report = (tmp_path / "job" / "report.md").read_text()
    assert "--report quick" in report and "predicted-vs-measured" in report
    assert "predicted vs measured" not in names
    # quick: all-4-bit is step 2's simulation, its real bitsandbytes load (the simulation check) left to --report full
    labels = list(board["variant"])  # as a full report orders them (all-NF4: of the source weights first, if scaled)
    assert labels[0] == "16-bit" and labels[1].startswith("all-NF4")
    scaled = labels[1] == "all-NF4, source weights"  # the plans hold channel-scaled weights: their all-NF4 is next
    nf4 = board.set_index("variant").loc["all-NF4, equalized" if scaled else "all-NF4"]
    assert nf4["measured_with"].startswith("simulated") and "--report full" in nf4["note"] and nf4["mean_kld"] > 0
    assert not any(n.startswith("bitsandbytes all-NF4") for n in names)
    assert "Simulation check" not in report and "the simulation check" in report
    # quick: no real all-INT8 load either (a reference at 8 bits a weight): --report full measures it
    assert not any("INT8" in n for n in names) and not any("INT8" in v for v in labels)
    assert f"all-INT8 ({QUICK_SKIPS['int8']})" in report and "are left out (`--report full` measures them)" in report


def test_a_parent_stage_keeps_the_gpu_peak_of_its_children_and_of_before_them(monkeypatch):
    """Each stage resets the GPU high-water mark; the stages around it must not lose what it saw."""
    from quantplan.common import profile as module

    gpu = {"now": 0, "peak": 0}

    def allocate(n):
        gpu["now"] += n
        gpu["peak"] = max(gpu["peak"], gpu["now"])

    def reset():
        gpu["peak"] = gpu["now"]

    monkeypatch.setattr(module, "_gpu_peak", lambda: gpu["peak"])
    real_reset = module._reset_peak
    monkeypatch.setattr(module, "_reset_peak", lambda: (real_reset(), reset()))
    with module.recording() as profile:
        with module.stage("outer"):
            allocate(900)
            allocate(-900)  # the outer stage's own peak, before the inner ones reset the mark
            with module.stage("inner"):
                allocate(300)
                allocate(-300)
            with module.stage("inner 2"):
                allocate(200)
                allocate(-200)
    peaks = {s.name: s.peak_gpu_bytes for s in profile.stages}
    assert peaks == {"outer": 900, "inner": 300, "inner 2": 200}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_stage_end_gives_freed_heap_memory_back():
    """Tensors freed inside a stage no longer count in the process's resident set after it (glibc keeps them)."""
    script = """
import ctypes, torch
from quantplan.common.profile import stage
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: tensors from the heap, as after big frees
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
with stage("temporaries"):
    kept = [torch.ones(1 << 18) for _ in range(400)][::100]  # 400 MB allocated, 4 MB kept
    held = rss()
print(held - rss())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) > 200 << 20
