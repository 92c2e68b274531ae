"""Streaming analysis (analysis/streaming.py): same table as analyze(), one block at a time, resumable."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from fixtures import CHILD_ENV
from killing import run_and_kill
from tiny import random_calibration, save_tiny, tiny_llama

from quantplan.analysis import INT8, NF4, TableMismatch, analyze, load_model, resolve_source
from quantplan.analysis.stream_weights import StreamingUnsupported
from quantplan.analysis.streaming import analyze_streaming
from quantplan.analysis.table import SensitivityTable
from quantplan.common.sizes import parse_size


def _same_meta(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}


@pytest.mark.parametrize(("tie", "fisher"), [(False, False), (True, False), (False, True), (True, True)])
def test_streamed_table_equals_in_memory_table(tmp_path, tie, fisher):
    folder = save_tiny(tmp_path / "model", layers=3, tie=tie)
    source = resolve_source(str(folder))
    calibration = random_calibration(samples=6)
    expected = analyze(load_model(source), calibration, [NF4, INT8], model_fingerprint=source.fingerprint,
                       progress=False, batch_size=4, fisher=fisher)
    streamed = analyze_streaming(folder, calibration, [NF4, INT8], max_memory="1GB", progress=False, batch_size=4,
                                 out_dir=tmp_path / "out", fisher=fisher)
    # same arithmetic: equal in practice (Fisher: the head's sums add chunk by chunk, in another order)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-6)
    assert streamed.df["output_fisher_error"].notna().any() == fisher
    _same_meta(streamed.meta, expected.meta)  # fingerprint, other_bytes, tied lm_head, ...
    assert (tmp_path / "out" / "sensitivity.parquet").is_file()
    assert not (tmp_path / "out" / "partial").exists()


@pytest.mark.parametrize("fisher", [False, True])
def test_streamed_qwen2_equals_in_memory_table(tmp_path, fisher):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "qwen2")
    source = resolve_source(str(tmp_path / "qwen2"))
    calibration = random_calibration(samples=6)
    expected = analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                       fisher=fisher)
    streamed = analyze_streaming(tmp_path / "qwen2", calibration, [NF4], progress=False, fisher=fisher)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-6)
    assert streamed.meta["fisher"] == fisher


def test_chunked_head_gives_the_whole_batch_loss_gradient():
    """Chunk by chunk (targets drawn from one seeded generator, summed loss / tokens) = analysis.fisher's loss."""
    import torch

    from quantplan.analysis.fisher import _next_token_loss
    from quantplan.analysis.probe import InputProbe
    from quantplan.analysis.stream_head import chunk_tokens, head_input_gradient

    model = tiny_llama(layers=1)
    hidden = torch.randn(3, 20, 64, dtype=torch.bfloat16)
    leaf = hidden.clone().requires_grad_()
    _next_token_loss(model.lm_head(model.model.norm(leaf)).float(), None, "sampled", seed=7).backward()
    for chunk in (1, 7, 60):
        got = head_input_gradient(model, InputProbe(model, []), "lm_head", hidden, seed=7, chunk=chunk)
        torch.testing.assert_close(got, leaf.grad, rtol=0, atol=0)
    weight_bytes = 256 * 64 * 2
    assert chunk_tokens(weight_bytes, 256) == 4  # 4 tokens x 256 logits x 32 bytes = the weight's 32 kB


def test_cap_too_small_refused_with_the_fix(tmp_path):
    folder = save_tiny(tmp_path / "model")
    with pytest.raises(StreamingUnsupported, match=r"--max-memory .* or more"):
        analyze_streaming(folder, random_calibration(), [NF4], max_memory="100kB", progress=False, fisher=True)
    assert parse_size("1500MiB") == 1500 * 2**20 and parse_size("2GB") == 2 * 10**9


def test_resume_refuses_another_calibration(tmp_path, monkeypatch):
    from quantplan.analysis import stream_store

    folder = save_tiny(tmp_path / "model")
    out = tmp_path / "out"
    commit = stream_store.StreamCheckpoint.commit

    def interrupted(self, step, *args):
        commit(self, step, *args)
        if step == 1:
            raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(stream_store.StreamCheckpoint, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_streaming(folder, random_calibration(), [NF4], out_dir=out, progress=False)
    assert json.loads((out / "partial" / "state.json").read_text())["steps_done"] == 2
    with pytest.raises(TableMismatch, match="another calibration"):
        analyze_streaming(folder, random_calibration(seed=5), [NF4], out_dir=out, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no partial results"):
        analyze_streaming(folder, random_calibration(), [NF4], out_dir=tmp_path / "empty", resume=True,
                          progress=False)


# steps: 0 embeddings, 1-3 layers 0-2 forward, 4 the head backward, 5-7 layers 2, 1, 0 backward
@pytest.mark.parametrize(("stop_after", "gradients"), [(4, "grad-0004"), (6, "grad-0002")])
def test_fisher_resumes_in_the_reverse_pass(tmp_path, monkeypatch, stop_after, gradients):
    from quantplan.analysis import stream_store

    folder = save_tiny(tmp_path / "model", layers=3)
    out = tmp_path / "out"
    calibration = random_calibration(samples=6)
    expected = analyze_streaming(folder, calibration, [NF4], batch_size=2, progress=False, fisher=True)
    commit = stream_store.StreamCheckpoint.commit

    def interrupted(self, step, *args):
        commit(self, step, *args)
        if step == stop_after:
            raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(stream_store.StreamCheckpoint, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_streaming(folder, calibration, [NF4], batch_size=2, out_dir=out, progress=False, fisher=True)
    partial = out / "partial"
    assert json.loads((partial / "state.json").read_text())["steps_done"] == stop_after + 1
    assert (partial / gradients).is_dir() and (partial / "hidden-0001").is_dir()
    assert len(list(partial.glob("grad-*"))) == 1  # one level of gradients on disk at a time
    monkeypatch.setattr(stream_store.StreamCheckpoint, "commit", commit)
    with pytest.raises(TableMismatch, match="another fisher"):
        analyze_streaming(folder, calibration, [NF4], batch_size=2, out_dir=out, resume=True, progress=False)
    resumed = analyze_streaming(folder, calibration, [NF4], batch_size=2, out_dir=out, resume=True, progress=False,
                                fisher=True)
    pd.testing.assert_frame_equal(resumed.df, expected.df, rtol=1e-9)
    assert not partial.exists()


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
    streaming.analyze_streaming(sys.argv[1], random_calibration(samples=6), [NF4], batch_size=2, fisher=True,
                                out_dir=sys.argv[2], progress=False, resume=sys.argv[3] == "resume")
""")


@pytest.mark.slow  # two fresh Python processes: ~20 s
def test_sigkill_midway_then_resume_gives_the_same_table(tmp_path):
    folder = save_tiny(tmp_path / "model", layers=4)
    out = tmp_path / "out"
    done = run_and_kill(_CHILD, [str(folder), str(out), "fresh"], out / "partial" / "state.json", "steps_done",
                        7)  # embeddings, 4 blocks forward, the head and one block backward: in the reverse pass
    assert 7 <= done < 10 and not (out / "sensitivity.parquet").exists()

    resumed = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), "resume"], env=CHILD_ENV,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after {done} steps" in resumed.stdout
    from quantplan.analysis import SensitivityTable

    expected = analyze_streaming(folder, random_calibration(samples=6), [NF4], batch_size=2, progress=False,
                                 fisher=True)
    pd.testing.assert_frame_equal(SensitivityTable.load(out).df, expected.df, rtol=1e-9)


def test_cli_analyze_with_max_memory(tmp_path, capsys):
    from quantplan.cli import main

    folder = save_tiny(tmp_path / "model")
    out = tmp_path / "table"
    assert main(["analyze", str(folder), "--max-memory", "1GB", "--samples", "4", "--seq-len", "32",
                 "--calib", str(_words(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert "plans use them" not in capsys.readouterr().out  # no fallback to output errors any more
    from quantplan.analysis import SensitivityTable

    table = SensitivityTable.load(out)
    assert table.meta["fisher"] and table.df["output_fisher_error"].notna().any()
    assert main(["analyze", str(folder), "--max-memory", "10kB", "--samples", "4", "--seq-len", "32",
                 "--calib", str(_words(tmp_path)), "--out", str(out), "--quiet"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def _words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 250 + 4}" for j in range(40)) for i in range(20)))
    return path


def test_run_with_max_memory_plans_and_exports_from_the_streamed_table(tmp_path, monkeypatch):
    from dataclasses import replace

    from quantplan import AnalyzeConfig, EndToEnd, run

    folder = save_tiny(tmp_path / "model")
    options = AnalyzeConfig(calib=str(_words(tmp_path)), samples=4, seq_len=32, progress=False, max_memory="1GB")
    checks = EndToEnd(refine=0)  # the refinement under the cap: tests/test_stream_gains.py
    memory = run(str(folder), "+20%", tmp_path / "memory", replace(options, max_memory=None, equalize=False),
                 end_to_end=checks)  # the streamed run reads the source weights as they are

    def whole(*args, **kwargs):
        raise AssertionError("the export under --max-memory loaded the 16-bit model whole")

    monkeypatch.setattr(importlib.import_module("quantplan.planner.export"), "_load_16bit", whole)
    out = run(str(folder), "+20%", tmp_path / "job", options, end_to_end=checks)
    assert out["checkpoint"].is_dir() and out["plan"].is_file()
    saved = json.loads(out["plan"].read_text())
    assert saved["objective"] == "fisher"  # auto uses the streamed Fisher scores
    # the default formats are the blocksize menu streamed too: the same plan as in memory
    assert SensitivityTable.load(tmp_path / "job").formats == ["nf4", "nf4-bs32"]
    # the verification shipped the menu plan or its blocksize-32 sibling: the streamed menu writer either way
    assert saved["tiers"] == ["nf4", "nf4-bs32"] and out["plan_obj"].mixed_blocksizes
    in_memory = json.loads(memory["plan"].read_text())
    assert saved["choices"] == in_memory["choices"] and saved["tiers"] == in_memory["tiers"]
    assert saved["checks"]["verification"]["chosen"] == in_memory["checks"]["verification"]["chosen"]
    assert saved["checks"]["verification"]["tokens"] == 4 * 32  # measured block by block (test_stream_variants.py)
