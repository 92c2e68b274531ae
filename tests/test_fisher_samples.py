"""The Fisher pass backpropagates only the first ``fisher_samples`` windows (whole batches), in memory and streamed."""

from __future__ import annotations

import pandas as pd
import pytest
from tiny import random_calibration, save_tiny

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.analyze import fisher_batches
from quantplan.analysis.streaming import analyze_streaming


def test_batches_round_up_and_stop_at_the_set():
    calibration = random_calibration(samples=10)  # 3 batches of 4 (the last one short)
    assert [fisher_batches(calibration, 4, n) for n in (1, 4, 5, 8, 9, 10, 64, None)] == [1, 1, 2, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="at least 1 calibration window"):
        fisher_batches(calibration, 4, 0)


def _table(folder, calibration, fisher_samples, **kwargs):
    source = resolve_source(str(folder))
    return analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                   batch_size=4, fisher=True, fisher_samples=fisher_samples, **kwargs)


def test_fewer_fisher_windows_change_only_the_fisher_scores(tmp_path):
    folder = save_tiny(tmp_path / "model", layers=2)
    calibration = random_calibration(samples=10)
    every = _table(folder, calibration, None)
    first = _table(folder, calibration, 4)
    assert every.meta["fisher_samples"] == 10 and first.meta["fisher_samples"] == 4
    fisher_columns = ["output_fisher_error"]
    same = every.df.drop(columns=fisher_columns)
    pd.testing.assert_frame_equal(first.df.drop(columns=fisher_columns), same)  # the Gram matrices see every window
    assert not first.df["output_fisher_error"].equals(every.df["output_fisher_error"])
    pd.testing.assert_frame_equal(_table(folder, calibration, 12).df, every.df)  # past the set: every window


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_table_equals_in_memory_with_fewer_fisher_windows(tmp_path, tie):
    folder = save_tiny(tmp_path / "model", layers=3, tie=tie)
    calibration = random_calibration(samples=10)
    expected = _table(folder, calibration, 5)
    streamed = analyze_streaming(folder, calibration, [NF4], max_memory="1GB", progress=False, batch_size=4,
                                 out_dir=tmp_path / "out", fisher=True, fisher_samples=5)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-6)
    assert streamed.meta["fisher_samples"] == expected.meta["fisher_samples"] == 8


@pytest.mark.parametrize("arch", ["llava", "mllama"])
def test_streamed_vlm_equals_in_memory_with_fewer_fisher_windows(arch, tmp_path):
    from vlm_models import save_tiny_vlm

    from quantplan.analysis import load_processor
    from quantplan.analysis.vision import load_image_calibration

    folder = save_tiny_vlm(arch, tmp_path / arch)
    source = resolve_source(str(folder))
    calibration = load_image_calibration(load_processor(source), "default", samples=4)
    expected = analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                       batch_size=2, fisher=True, fisher_samples=2)
    streamed = analyze_streaming(folder, calibration, [NF4], progress=False, batch_size=2, fisher=True,
                                 fisher_samples=2)
    pd.testing.assert_frame_equal(streamed.df, expected.df, rtol=1e-4)
    every = analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                    batch_size=2, fisher=True)
    assert not every.df["output_fisher_error"].equals(expected.df["output_fisher_error"])
    assert expected.meta["fisher_samples"] == 2 and every.meta["fisher_samples"] == 4


def test_the_default_backpropagates_a_quarter_of_the_windows_and_at_least_eight():
    from quantplan.analysis.config import AnalyzeConfig

    assert [AnalyzeConfig(samples=n).fisher_windows for n in (4, 8, 16, 32, 128)] == [4, 8, 8, 8, 32]
    assert AnalyzeConfig(samples=32, fisher_samples=32).fisher_windows == 32


def test_run_reuses_a_table_only_with_the_same_fisher_windows(tmp_path, capsys):
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.pipeline import analyze_model

    folder = save_tiny(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    config = AnalyzeConfig(samples=8, seq_len=16, fisher_samples=4, progress=False, formats="nf4")
    first = analyze_model(source, tmp_path / "out", config)
    assert first.meta["fisher_samples"] == 4
    again = analyze_model(source, tmp_path / "out", config, reuse=True)
    assert "reusing the matching sensitivity table" in capsys.readouterr().out
    assert again.meta["created"] == first.meta["created"]
    every = analyze_model(source, tmp_path / "out", AnalyzeConfig(samples=8, seq_len=16, progress=False,
                                                                  formats="nf4"), reuse=True)
    assert "backpropagated 4 calibration windows and this run asks for 8" in capsys.readouterr().out
    assert every.meta["fisher_samples"] == 8
