"""analysis/: bad inputs get one clear error; an interrupted run keeps its partial results and resumes."""

from __future__ import annotations

import importlib
import json
import os
import signal

import pandas as pd
import pytest
import torch
from tiny import random_calibration, save_tiny, tiny_llama, word_tokenizer

from quantplan.analysis import (
    NF4,
    SensitivityTable,
    TableMismatch,
    analyze,
    load_calibration,
    parse_formats,
    resolve_source,
)
from quantplan.analysis.calibration import load_texts, pack_calibration
from quantplan.analysis.modules import list_modules
from quantplan.analysis.probe import partial_state_bytes
from quantplan.cli import main


def test_unknown_model_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a valid hub id|cannot reach model"):
        resolve_source("no such/model id")
    with pytest.raises(FileNotFoundError, match="cannot reach model|neither"):
        resolve_source("quantplan-test/does-not-exist-anywhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_truncated_weights_are_one_line_naming_the_file(tmp_path, capsys):
    folder = save_tiny(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    capsys.readouterr()
    for extra in ([], ["--max-memory", "1GB", "--no-fisher"]):  # from_pretrained, and the streaming reader
        code = main(["analyze", str(folder), "--out", str(tmp_path / "out"), "--samples", "2", "--seq-len", "16",
                     "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert str(weights) in err and "download the model again" in err and "save_pretrained" in err
    from quantplan.analysis.streaming import analyze_streaming

    with pytest.raises(ValueError, match="model.safetensors is damaged or truncated"):  # the streaming reader itself
        analyze_streaming(folder, random_calibration(), progress=False)


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="unknown format 'nf3'.*nf4, nf4-bs32, fp4, int8"):
        parse_formats("nf4,nf3")
    assert [f.name for f in parse_formats("NF4, int8")] == ["nf4", "int8"]


def test_empty_and_short_calibration(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7\n\nw8 w9\n")
    with pytest.raises(ValueError, match=r"only \d+ tokens.*lower --samples/--seq-len"):
        load_calibration(word_tokenizer(), str(short), samples=4, seq_len=16)


def test_seq_len_beyond_model_limit():
    with pytest.raises(ValueError, match="beyond the model's limit of 256"):
        pack_calibration(["w5 w6"] * 100, word_tokenizer(), samples=1, seq_len=512, max_positions=256)


def test_local_sources_through_datasets(tmp_path):
    records = [{"text": " ".join(f"w{(i * 7 + j) % 250 + 3}" for j in range(20)), "id": i} for i in range(40)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pd.DataFrame(records).to_csv(tmp_path / "data.csv", index=False)
    pd.DataFrame(records).to_parquet(tmp_path / "data.parquet")
    tokenizer = word_tokenizer()
    packed = [load_calibration(tokenizer, str(tmp_path / f"data.{ext}"), samples=4, seq_len=32)
              for ext in ("jsonl", "csv", "parquet")]
    assert all(torch.equal(packed[0].input_ids, p.input_ids) for p in packed)
    again = load_calibration(tokenizer, str(tmp_path / "data.jsonl"), samples=4, seq_len=32)
    assert again.fingerprint == packed[0].fingerprint  # deterministic with the same seed
    other_seed = load_calibration(tokenizer, str(tmp_path / "data.jsonl"), samples=4, seq_len=32, seed=1)
    assert other_seed.fingerprint != packed[0].fingerprint


def test_shipped_calibration_is_large_enough():
    texts = load_texts(None)
    assert sum(len(t) for t in texts) > 200_000  # ~60k SmolLM2 tokens
    heldout = set(load_texts("heldout"))
    assert heldout and not heldout & set(texts)


class Interrupt:
    """A forward hook that presses Ctrl-C (sends this process SIGINT) on the n-th call: the running batch
    finishes, then the pass saves and stops."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_run_saves_partial_results_and_resumes(tmp_path):
    calibration = random_calibration(samples=12)
    model = tiny_llama()
    expected = analyze(model, calibration, [NF4], progress=False, batch_size=2)

    handle = model.model.layers[0].register_forward_hook(Interrupt(at=4))
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        analyze(model, calibration, [NF4], progress=False, batch_size=2, out_dir=tmp_path)
    handle.remove()
    state = json.loads((tmp_path / "partial" / "state.json").read_text())
    assert state["batches_done"] == 4  # the batch Ctrl-C came in ran to its end
    assert not (tmp_path / "sensitivity.parquet").exists()

    with pytest.raises(TableMismatch, match="another"):
        analyze(model, random_calibration(samples=12, seed=5), [NF4], progress=False, batch_size=2,
                out_dir=tmp_path, resume=True)
    resumed = analyze(model, calibration, [NF4], progress=False, batch_size=2, out_dir=tmp_path, resume=True)
    columns = ["output_rel_error", "weight_rel_error", "tokens", "input_max_abs"]
    pd.testing.assert_frame_equal(resumed.df[columns], expected.df[columns], rtol=1e-9)
    assert not (tmp_path / "partial").exists()
    assert (tmp_path / "sensitivity.parquet").exists()


def test_partial_statistics_size_is_estimated_up_front(tmp_path, monkeypatch, capsys):
    model, calibration = tiny_llama(), random_calibration(samples=12)
    monkeypatch.setattr(importlib.import_module("quantplan.analysis.partial_state"), "LARGE_PARTIAL_BYTES", 0)
    handle = model.model.layers[1].register_forward_hook(Interrupt(at=2))
    with pytest.raises(KeyboardInterrupt):
        analyze(model, calibration, [NF4], progress=False, batch_size=2, out_dir=tmp_path)
    handle.remove()
    announced = capsys.readouterr().out
    assert "partial statistics" in announced and str(tmp_path / "partial") in announced
    written = sum(f.stat().st_size for f in (tmp_path / "partial").glob("state-*.safetensors"))
    candidates = set(json.loads((tmp_path / "partial" / "state.json").read_text())["candidates"])
    estimate = partial_state_bytes([i for i in list_modules(model) if i.name in candidates], sample_rows=2 * 32)
    assert written <= estimate <= 1.6 * written  # an upper bound: shared inputs are counted per module
    assert f"up to {estimate / 1e6:.1f} MB of partial statistics" in announced  # what analyze() said up front


def test_resume_without_partial_results_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no partial results"):
        analyze(tiny_llama(), random_calibration(), [NF4], progress=False, out_dir=tmp_path, resume=True)


def test_table_round_trip_and_mismatch_refused(tmp_path):
    table = analyze(tiny_llama(), random_calibration(), [NF4], progress=False, model_fingerprint="local:abc")
    table.save(tmp_path)
    loaded = SensitivityTable.load(tmp_path)
    assert loaded.content_hash == table.content_hash
    loaded.check_matches("local:abc", table.meta["calibration_fingerprint"], ["nf4"])
    with pytest.raises(TableMismatch, match="another model"):
        loaded.check_matches("local:other")
    with pytest.raises(TableMismatch, match="another calibration data"):
        loaded.check_matches(calibration="0000")
    with pytest.raises(TableMismatch, match=r"no measurements for \['int8'\]"):
        loaded.check_matches(formats=["int8"])
    with pytest.raises(FileNotFoundError, match="quantplan analyze"):
        SensitivityTable.load(tmp_path / "nowhere")
