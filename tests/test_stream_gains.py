"""The quantized-context gradient pass block by block (analysis/stream_gains.py): restore_gains' numbers under a
cap, the streamed --context columns, and --refine / the automatic refinement under --max-memory."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny import PaddedCalibration, random_calibration, save_tiny

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.endtoend import restore_gains
from quantplan.analysis.formats import NF4_BS32
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache
from quantplan.analysis.stream_gains import StreamedGains, streamed_restore_gains
from quantplan.analysis.stream_variants import StreamedKLs, StreamOptions
from quantplan.analysis.stream_weights import StreamingUnsupported
from quantplan.analysis.streaming import analyze_streaming

MENU = {"nf4": NF4, "nf4-bs32": NF4_BS32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("gains") / "model", layers=3, hidden=128, intermediate=256)


def _context(model) -> tuple[list[str], dict]:
    """Every Linear but layer 0's attention (lm_head included), every other one at blocksize 32."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and ".0.self_attn" not in n]
    return names, {n: NF4_BS32 if i % 2 else NF4 for i, n in enumerate(names)}


@pytest.mark.parametrize(("calibration", "max_batches"), [(random_calibration(samples=6), None),
                                                          (PaddedCalibration(), 1)])
def test_streamed_gains_equal_in_memory_gains(tiny, calibration, max_batches):
    model = load_model(resolve_source(str(tiny)), dtype=torch.float32)
    names, formats = _context(model)
    reference = KLReference(model, calibration, 4, max_batches)
    expected = restore_gains(model, reference, QuantCache(model, NF4), names, formats=formats, menu=MENU,
                             context_error=True)
    got = streamed_restore_gains(tiny, calibration, names, NF4, formats=formats, menu=MENU, context_error=True,
                                 options=StreamOptions(dtype=torch.float32, batch_size=4, max_batches=max_batches,
                                                       max_memory="1GB"))
    assert got.tokens == expected.tokens == reference.tokens > 0
    assert got.kld == pytest.approx(expected.kld, rel=1e-5) and got.kld > 0
    assert got.gains.keys() == expected.gains.keys() == set(names)
    for name in names:
        assert got.gains[name] == pytest.approx(expected.gains[name], rel=1e-4, abs=1e-10), name
        assert got.context_error[name] == pytest.approx(expected.context_error[name], rel=1e-5), name
        assert got.moves[name].keys() == MENU.keys()
        for label, move in expected.moves[name].items():
            streamed = got.moves[name][label]
            assert streamed.gain == pytest.approx(move.gain, rel=1e-4, abs=1e-10), (name, label)
            assert (streamed.error_sq, streamed.overlap) == (move.error_sq, move.overlap)  # the same round trips
    assert got.gains["lm_head"] > 0  # lm_head's weight gradient, chunk by chunk at the head


def test_streamed_context_columns_equal_in_memory(tiny, tmp_path):
    source = resolve_source(str(tiny))
    calibration = random_calibration(samples=6)
    expected = analyze(load_model(source, dtype=torch.float32), calibration, [NF4], model_fingerprint=source.fingerprint,
                       progress=False, batch_size=4, context=True)
    streamed = analyze_streaming(tiny, calibration, [NF4], max_memory="1GB", progress=False, batch_size=4,
                                 dtype=torch.float32, out_dir=tmp_path / "out", context=True)
    context = ["restore_gain", "context_output_rel_error"]
    assert streamed.df[context].notna().sum().tolist() == expected.df[context].notna().sum().tolist() == [21, 21]
    pd.testing.assert_frame_equal(streamed.df[context], expected.df[context], rtol=1e-4)
    pd.testing.assert_frame_equal(streamed.df.drop(columns=context), expected.df.drop(columns=context), rtol=1e-6)
    got, want = streamed.meta["context"], expected.meta["context"]
    assert (got["format"], got["tokens"]) == (want["format"], want["tokens"]) == ("nf4", 6 * 32)
    assert got["all_4bit_kld"] == pytest.approx(want["all_4bit_kld"], rel=1e-5)
    assert not (tmp_path / "out" / "partial").exists()


def test_too_small_a_cap_is_refused_with_the_fix(tiny):
    from quantplan import AnalyzeConfig
    from quantplan.dry_run import check_streamed_run_fits

    with pytest.raises(StreamingUnsupported, match=r"gradient pass.*--max-memory \d+(\.\d\d)?[GM]B or more"):
        streamed_restore_gains(tiny, random_calibration(), ["model.layers.1.mlp.up_proj"], NF4,
                               options=StreamOptions(max_memory="100kB"))
    config = AnalyzeConfig(samples=4, seq_len=32, max_memory="100kB", progress=False)
    with pytest.raises(ValueError, match=r"quantized-context gradient pass.*--max-memory \d+(\.\d\d)?[GM]B or more"):
        check_streamed_run_fits(resolve_source(str(tiny)), config, verify=False, gradients=True)


def _words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 250 + 4}" for j in range(40)) for i in range(20)))
    return path


@pytest.mark.parametrize("auto", [False, True])
def test_run_under_the_cap_refines_as_in_memory(tmp_path, auto):
    from quantplan import AnalyzeConfig, EndToEnd, run
    from quantplan.planner.auto_refine import AutoRefine

    folder = save_tiny(tmp_path / "model", layers=3)
    options = AnalyzeConfig(calib=str(_words(tmp_path)), samples=4, seq_len=32, progress=False, formats="nf4")
    checks = EndToEnd(auto=AutoRefine(rounds=1, max_all_4bit_kld=0.0)) if auto else EndToEnd(refine=2)
    plans = {}
    for cap in (None, "1GB"):
        out = run(str(folder), "+20%", tmp_path / f"job-{cap}", replace(options, max_memory=cap), end_to_end=checks)
        plans[cap] = json.loads(out["plan"].read_text())
    capped, memory = plans["1GB"], plans[None]
    assert capped["choices"] == memory["choices"]
    got, want = capped["checks"]["refinement"], memory["checks"]["refinement"]
    assert got["rounds"] == want["rounds"] == (1 if auto else 2) and got["tokens"] == want["tokens"] == 4 * 32
    assert (got["trigger"] is not None) == auto and got["shipped"] == want["shipped"]
    for streamed, loaded in zip(got["history"], want["history"], strict=True):
        assert streamed["kept_before"] == loaded["kept_before"]
        assert streamed["kld_before"] == pytest.approx(loaded["kld_before"], rel=1e-3)


def test_automatic_refinement_skips_itself_when_the_cap_cannot_hold_the_gradient_pass(tiny, capsys):
    from quantplan.endtoend import EndToEnd, Measures
    from quantplan.planner.auto_refine import AutoRefine
    from quantplan.planner.config import PlanConfig

    calibration = random_calibration(samples=4)
    table = analyze(load_model(resolve_source(str(tiny))), calibration, [NF4], progress=False, fisher=True)
    measures = Measures(StreamedGains(tiny, calibration, NF4, StreamOptions(max_memory="100kB")),
                        StreamedKLs(tiny, calibration, NF4), progress=False)
    checked = EndToEnd(auto=AutoRefine(rounds=1, max_all_4bit_kld=0.0)).checks(table, "+20%", PlanConfig(), measures)
    out = capsys.readouterr().out
    assert "the automatic refinement cannot run under --max-memory" in out and re.search(r"--max-memory \d+(\.\d\d)?[GM]B or more", out)
    assert checked.checks.verification is not None and checked.checks.refinement is None


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama"])
def test_streamed_gains_of_a_vlm_equal_in_memory_gains(arch, tmp_path):
    """The reverse pass goes on through the splice into the vision blocks (Mllama: the cross-attention layers'
    gradient of the image features summed before the projector), as the Fisher pass's does."""
    import math

    from vlm_models import save_tiny_vlm

    from quantplan.analysis import load_processor
    from quantplan.analysis.vision import load_image_calibration

    folder = save_tiny_vlm(arch, tmp_path / arch)
    source = resolve_source(str(folder))
    model = load_model(source, dtype=torch.float32)
    calibration = load_image_calibration(load_processor(source), "default", samples=2)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = restore_gains(model, KLReference(model, calibration, 2), QuantCache(model, NF4), names,
                             context_error=True)
    got = streamed_restore_gains(folder, calibration, names, NF4, context_error=True,
                                 options=StreamOptions(dtype=torch.float32, batch_size=2))
    assert got.kld == pytest.approx(expected.kld, rel=1e-4)
    vision = [n for n in names if "vision" in n or "visual" in n]
    assert sum(math.isfinite(got.gains[n]) for n in vision) >= 10  # the gradient reached the tower
    for name in names:
        assert got.gains[name] == pytest.approx(expected.gains[name], rel=1e-3, abs=1e-10, nan_ok=True), name
        assert got.context_error[name] == pytest.approx(expected.context_error[name], rel=1e-4, nan_ok=True), name


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable RSS high-water mark")
def test_streamed_gradient_pass_memory_does_not_grow_with_the_batches(tmp_path):
    """A 262k vocabulary (0.5 MB of float32 logits a token): the head's KL and its gradient come chunk by chunk."""
    from tiny import LARGE_VOCAB, large_vocab_llama

    from quantplan.common.profile import recording, stage

    folder = tmp_path / "big"
    model = large_vocab_llama()
    model.save_pretrained(folder)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    del model

    def peak(batches: int) -> int:
        calibration = random_calibration(samples=batches, seq_len=16, vocab=LARGE_VOCAB, seed=1)
        with recording() as profile, stage("streamed gradient pass"):
            got = streamed_restore_gains(folder, calibration, names, NF4,
                                         options=StreamOptions(batch_size=1, max_memory="1GB"))
        assert got.tokens == batches * 16 and got.kld > 0
        return profile.stages[0].peak_rss_bytes

    peak(1)  # warm up the allocator and the libraries
    few, many = peak(2), peak(5)
    logits_per_batch = 16 * LARGE_VOCAB * 4
    # kept for every batch, 3 more batches would add 3 x 16 MB of logits alone (and their gradients); here nothing
    assert many - few < 2 * logits_per_batch, (few, many)
