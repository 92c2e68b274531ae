"""Streamed end-to-end checks (analysis/stream_variants.py): the in-memory KLs and scoreboard, block by block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import random_calibration, save_tiny, save_tiny_english

from quantplan.analysis import NF4, load_model, resolve_source
from quantplan.analysis.formats import FourBit
from quantplan.analysis.reference import KLReference, calibration_klds
from quantplan.analysis.simulate import QuantCache
from quantplan.analysis.stream_variants import StreamOptions, streamed_klds
from quantplan.analysis.stream_weights import StreamingUnsupported


def _variants(model) -> dict:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return {"16-bit": None, "all": names, "layer 0": [n for n in names if ".0." in n],
            "last, bs32": {n: FourBit(blocksize=32) for n in names if ".2." in n},
            "mlp, mixed": {n: (FourBit(quant_type="fp4") if "up" in n else None) for n in names if "mlp" in n},
            "nothing": []}


@pytest.mark.parametrize(("tie", "max_batches"), [(False, None), (True, 2)])
def test_streamed_klds_equal_in_memory_klds(tmp_path, tie, max_batches):
    folder = save_tiny(tmp_path / "model", layers=3, tie=tie)
    model = load_model(resolve_source(str(folder)))
    calibration = random_calibration(samples=10)  # batches of 4: the last one has 2 windows
    variants = _variants(model)
    if not tie:
        variants["lm_head"] = ["lm_head", "model.layers.1.self_attn.o_proj"]
    reference = KLReference(model, calibration, 4, max_batches)
    expected = calibration_klds(reference, QuantCache(model, NF4), variants)
    got = streamed_klds(folder, calibration, variants, NF4,
                        StreamOptions(batch_size=4, max_batches=max_batches, max_memory="1GB"))
    assert got.tokens == reference.tokens == 32 * (8 if max_batches else 10)
    assert got.kld.keys() == expected.keys()
    for label, value in expected.items():
        assert got.kld[label] == pytest.approx(value, rel=1e-5, abs=1e-12), label
    assert got.kld["16-bit"] == got.kld["nothing"] == 0
    assert got.kld["all"] > got.kld["layer 0"] > 0


@pytest.mark.parametrize("pieces", [False, True], ids=["one-piece", "pieces-of-3"])
def test_streamed_fidelity_equals_in_memory_fidelity(tmp_path, pieces, monkeypatch):
    """Also with the streamed comparison in pieces of 3 rows (analysis.head_chunks.HeadChunk.pieces) against the
    in-memory one in one piece: the pieces' borders inside the streamed chunks change no number."""
    from quantplan.analysis import head_chunks
    from quantplan.reports.fidelity import heldout_reference, measure_variants, measure_variants_streamed

    folder = save_tiny(tmp_path / "model", layers=3)
    model = load_model(resolve_source(str(folder)))
    ids = random_calibration(samples=5, seed=3).input_ids
    variants = _variants(model)
    expected = measure_variants(heldout_reference(model, ids, 2), QuantCache(model, NF4), variants)
    if pieces:
        monkeypatch.setattr(head_chunks, "PIECE_BYTES", 3 * 4 * model.config.vocab_size)
        assert head_chunks.piece_rows(model.config.vocab_size) == 3
    got = measure_variants_streamed(folder, ids, variants, NF4, StreamOptions(batch_size=2))
    for label in variants:
        np.testing.assert_allclose(got[label].kld, expected[label].kld, rtol=1e-4, atol=1e-7, err_msg=label)
        np.testing.assert_array_equal(got[label].same_top, expected[label].same_top)
        np.testing.assert_allclose(got[label].nll, expected[label].nll, rtol=1e-6)
        assert len(got[label].nll) == 5 * 31


def test_a_name_in_no_block_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "model")
    with pytest.raises(StreamingUnsupported, match="run without --max-memory"):
        streamed_klds(folder, random_calibration(), {"bad": ["model.norm"]}, NF4)


def test_cap_too_small_for_the_check_is_refused_with_the_fix(tmp_path):
    """The refusal writes the cap as given (not "0.00 GB") and names a cap that fits."""
    folder = save_tiny(tmp_path / "model")
    with pytest.raises(StreamingUnsupported, match=r"--max-memory 10\.0 kB is too small for the streamed end-to-end "
                                                   r"check.*--max-memory \d+(\.\d\d)?[GM]B or more"):
        streamed_klds(folder, random_calibration(), {"v": []}, NF4, StreamOptions(max_memory="10kB"))


def test_run_under_the_cap_verifies_and_scores_as_in_memory(tmp_path):
    from quantplan import AnalyzeConfig, run
    from quantplan.reports.compare import CompareConfig, ReportDepth

    folder = save_tiny_english(tmp_path / "model", layers=3)
    compare = CompareConfig(samples=4, seq_len=32, progress=False, report=ReportDepth.QUICK)
    results = {}
    for cap in (None, "1GB"):
        options = AnalyzeConfig(samples=4, seq_len=32, progress=False, max_memory=cap, formats="nf4")  # streamed: nf4
        results[cap] = run(str(folder), "+20%", tmp_path / f"job-{cap}", options, compare=compare)
    checks = {cap: json.loads(r["plan"].read_text())["checks"]["verification"] for cap, r in results.items()}
    capped, expected = checks["1GB"], checks[None]
    assert capped["chosen"] == expected["chosen"] and capped["tokens"] == expected["tokens"] == 4 * 32
    assert capped["calibration_kld"].keys() == expected["calibration_kld"].keys()
    for label, value in expected["calibration_kld"].items():
        assert capped["calibration_kld"][label] == pytest.approx(value, rel=1e-4), label

    boards = {cap: pd.read_csv(r["scoreboard"]).set_index("variant") for cap, r in results.items()}
    board, memory = boards["1GB"], boards[None]
    assert {"reference", "uniform", "dynamic", "heuristic"} <= set(board["kind"])
    assert "all-INT8" not in " ".join(board.index)  # a real bitsandbytes load: skipped under the cap
    exported = board["measured_with"] == "bitsandbytes (exported checkpoint, block by block)"
    assert exported.sum() == 1  # the plan's exported checkpoint, measured through bitsandbytes block by block
    assert (board.loc[(board["kind"] != "reference") & ~exported, "measured_with"].str.startswith("simulated")).all()
    row, plan_row = board[exported].iloc[0], board.loc[board.index[exported][0].removesuffix(" (exported checkpoint)")]
    assert row["kind"] == "dynamic" and row["mean_kld"] > 0 and row["footprint_bytes"] > 0
    assert row["mean_kld"] == pytest.approx(plan_row["mean_kld"], rel=0.5)  # close to its simulation
    assert row["simulated_mean_kld"] == plan_row["mean_kld"]
    # the simulated KLs in memory (simulated_mean_kld of every row that has one) = the streamed ones
    shared = memory.index[memory["simulated_mean_kld"].notna()].intersection(board.index)
    assert len(shared) >= 3
    np.testing.assert_allclose(board.loc[shared, "simulated_mean_kld"], memory.loc[shared, "simulated_mean_kld"],
                               rtol=1e-4)
    assert board.loc["16-bit", "ppl"] == pytest.approx(memory.loc["16-bit", "ppl"], rel=1e-5)
    report = results["1GB"]["md"].read_text()
    assert "under --max-memory" in report and "real bitsandbytes loads of all-INT8 and all-4-bit" in report
    assert "exported checkpoint is measured block by block" in report and "(exported checkpoint)" in report

    from quantplan.cli import main  # `quantplan compare --max-memory` measures the same capped scoreboard

    assert main(["compare", str(folder), "--plan", str(results["1GB"]["plan"]), "--out", str(tmp_path / "cmp"),
                 "--max-memory", "1GB", "--report", "quick", "--heldout-samples", "4", "--heldout-seq-len", "32",
                 "--checkpoint", str(results["1GB"]["checkpoint"]), "--quiet"]) == 0
    again = pd.read_csv(tmp_path / "cmp" / "scoreboard.csv").set_index("variant")
    pd.testing.assert_series_equal(again["mean_kld"], board["mean_kld"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable RSS high-water mark")
def test_streamed_check_memory_does_not_grow_with_the_batches(tmp_path):
    """A 262k vocabulary (0.5 MB of float32 logits a token): the head compares chunk by chunk, batch by batch."""
    from tiny import LARGE_VOCAB, large_vocab_llama

    from quantplan.common.profile import recording, stage

    folder = tmp_path / "big"
    model = large_vocab_llama()
    model.save_pretrained(folder)
    variants = {"all": [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]}
    del model

    def peak(batches: int) -> int:
        calibration = random_calibration(samples=batches, seq_len=16, vocab=LARGE_VOCAB, seed=1)
        with recording() as profile, stage("streamed check"):
            got = streamed_klds(folder, calibration, variants, NF4, StreamOptions(batch_size=1))
        assert got.tokens == batches * 16 and got.kld["all"] > 0
        return profile.stages[0].peak_rss_bytes

    peak(1)  # warm up the allocator and the libraries
    few, many = peak(2), peak(8)
    logits_per_batch = 16 * LARGE_VOCAB * 4
    # kept for every batch, 6 more batches would add 6 x 16 MB = 96 MB; compared chunk by chunk, nothing
    assert many - few < 2 * logits_per_batch, (few, many)
