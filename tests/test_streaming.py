"""Streaming analysis (analysis/streaming.py): same table as analyze(), one block at a time, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from fixtures import CHILD_ENV
from killing import run_and_kill
from tiny import random_calibration, save_tiny

from quantplan.analysis import INT8, NF4, TableMismatch, analyze, load_model, resolve_source
from quantplan.analysis.stream_weights import StreamingUnsupported
from quantplan.analysis.streaming import analyze_streaming
from quantplan.common.sizes import parse_size


def _same_meta(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_table_equals_in_memory_table(tmp_path, tie):
    folder = save_tiny(tmp_path / "model", layers=3, tie=tie)
    source = resolve_source(str(folder))
    calibration = random_calibration(samples=6)
    expected = analyze(load_model(source), calibration, [NF4, INT8], model_fingerprint=source.fingerprint,
                       progress=False, batch_size=4)
    streamed = analyze_streaming(folder, calibration, [NF4, INT8], max_memory="1GB", progress=False, batch_size=4,
                                 out_dir=tmp_path / "out")
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-6)  # same arithmetic: equal in practice
    _same_meta(streamed.meta, expected.meta)  # fingerprint, other_bytes, tied lm_head, ...
    assert (tmp_path / "out" / "sensitivity.parquet").is_file()
    assert not (tmp_path / "out" / "partial").exists()


def test_streamed_qwen2_equals_in_memory_table(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "qwen2")
    source = resolve_source(str(tmp_path / "qwen2"))
    calibration = random_calibration(samples=6)
    expected = analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False)
    streamed = analyze_streaming(tmp_path / "qwen2", calibration, [NF4], progress=False)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-6)


def test_cap_too_small_and_fisher_refused_with_the_fix(tmp_path):
    folder = save_tiny(tmp_path / "model")
    with pytest.raises(StreamingUnsupported, match=r"--max-memory .* or more"):
        analyze_streaming(folder, random_calibration(), [NF4], max_memory="100kB", progress=False)
    with pytest.raises(StreamingUnsupported, match="--no-fisher"):
        analyze_streaming(folder, random_calibration(), [NF4], fisher=True, progress=False)
    assert parse_size("1500MiB") == 1500 * 2**20 and parse_size("2GB") == 2 * 10**9


def test_resume_refuses_another_calibration(tmp_path, monkeypatch):
    from quantplan.analysis import stream_store

    folder = save_tiny(tmp_path / "model")
    out = tmp_path / "out"
    commit = stream_store.StreamCheckpoint.commit

    def interrupted(self, stage, *args):
        commit(self, stage, *args)
        if stage == 1:
            raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(stream_store.StreamCheckpoint, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_streaming(folder, random_calibration(), [NF4], out_dir=out, progress=False)
    assert json.loads((out / "partial" / "state.json").read_text())["stages_done"] == 2
    with pytest.raises(TableMismatch, match="another calibration"):
        analyze_streaming(folder, random_calibration(seed=5), [NF4], out_dir=out, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no partial results"):
        analyze_streaming(folder, random_calibration(), [NF4], out_dir=tmp_path / "empty", resume=True,
                          progress=False)


_CHILD = textwrap.dedent("""
    import sys, time
    from quantplan.analysis import NF4
    from quantplan.analysis import stream_store, streaming
    from tiny import random_calibration

    commit = stream_store.StreamCheckpoint.commit

    def slow_commit(self, *args):  # stretch each block so the parent can kill the run midway
        commit(self, *args)
        time.sleep(0.4)

    stream_store.StreamCheckpoint.commit = slow_commit
    streaming.analyze_streaming(sys.argv[1], random_calibration(samples=6), [NF4], batch_size=2,
                                out_dir=sys.argv[2], progress=False, resume=sys.argv[3] == "resume")
""")


@pytest.mark.slow  # two fresh Python processes: ~20 s
def test_sigkill_midway_then_resume_gives_the_same_table(tmp_path):
    folder = save_tiny(tmp_path / "model", layers=4)
    out = tmp_path / "out"
    done = run_and_kill(_CHILD, [str(folder), str(out), "fresh"], out / "partial" / "state.json", "stages_done",
                        3)  # embeddings + 2 blocks
    assert 3 <= done < 6 and not (out / "sensitivity.parquet").exists()

    resumed = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), "resume"], env=CHILD_ENV,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after {done} stages" in resumed.stdout
    from quantplan.analysis import SensitivityTable

    expected = analyze_streaming(folder, random_calibration(samples=6), [NF4], batch_size=2, progress=False)
    pd.testing.assert_frame_equal(SensitivityTable.load(out).df, expected.df, rtol=1e-9)


def test_cli_analyze_with_max_memory(tmp_path, capsys):
    from quantplan.cli import main

    folder = save_tiny(tmp_path / "model")
    out = tmp_path / "table"
    assert main(["analyze", str(folder), "--max-memory", "1GB", "--samples", "4", "--seq-len", "32",
                 "--calib", str(_words(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert "Fisher" in capsys.readouterr().out
    from quantplan.analysis import SensitivityTable

    table = SensitivityTable.load(out)
    assert not table.meta["fisher"] and table.df["output_rel_error"].notna().any()
    assert main(["analyze", str(folder), "--max-memory", "10kB", "--samples", "4", "--seq-len", "32",
                 "--calib", str(_words(tmp_path)), "--out", str(out), "--quiet"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def _words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 250 + 4}" for j in range(40)) for i in range(20)))
    return path


def test_run_with_max_memory_plans_and_exports_from_the_streamed_table(tmp_path):
    from quantplan import AnalyzeConfig, EndToEnd, run

    folder = save_tiny(tmp_path / "model")
    options = AnalyzeConfig(calib=str(_words(tmp_path)), samples=4, seq_len=32, progress=False, max_memory="1GB")
    out = run(str(folder), "+20%", tmp_path / "job", options)
    assert out["checkpoint"].is_dir() and out["plan"].is_file()
    saved = json.loads(out["plan"].read_text())
    assert saved["objective"] == "output"  # auto falls back: no Fisher when streamed
    assert "verification" not in saved["checks"]  # the whole-model check is skipped under --max-memory
    with pytest.raises(ValueError, match="--refine"):
        run(str(folder), "+20%", tmp_path / "job", options, overwrite=True, end_to_end=EndToEnd(refine=2))
