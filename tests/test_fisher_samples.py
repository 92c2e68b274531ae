"""The Fisher pass backpropagates only the first ``fisher_samples`` windows (whole batches), in memory and streamed."""

from __future__ import annotations

import pandas as pd
import pytest
from tiny import LabelledCalibration, random_calibration, save_tiny

from quantplan.analysis import NF4, analyze, load_model, resolve_source
from quantplan.analysis.fisher_windows import backward_share, default_windows
from quantplan.analysis.streaming import analyze_streaming


def test_batches_round_up_and_stop_at_the_set():
    calibration = random_calibration(samples=10)  # 3 batches of 4 (the last one short)
    shares = [backward_share(calibration, 4, n) for n in (1, 4, 5, 8, 9, 10, 64, None)]
    assert [s.batches for s in shares] == [1, 1, 2, 2, 3, 3, 3, 2]  # None: 8 of 10 windows
    assert [s.windows for s in shares] == [4, 4, 8, 8, 10, 10, 10, 8]
    with pytest.raises(ValueError, match="at least 1 calibration window"):
        backward_share(calibration, 4, 0)


def _table(folder, calibration, fisher_samples, **kwargs):
    source = resolve_source(str(folder))
    return analyze(load_model(source), calibration, [NF4], model_fingerprint=source.fingerprint, progress=False,
                   batch_size=4, fisher=True, fisher_samples=fisher_samples, **kwargs)


def test_fewer_fisher_windows_change_only_the_fisher_scores(tmp_path):
    folder = save_tiny(tmp_path / "model", layers=2)
    calibration = random_calibration(samples=10)
    every = _table(folder, calibration, 10)
    first = _table(folder, calibration, 4)
    assert every.meta["fisher_samples"] == 10 and first.meta["fisher_samples"] == 4
    fisher_columns = ["output_fisher_error"]
    same = every.df.drop(columns=fisher_columns)
    pd.testing.assert_frame_equal(first.df.drop(columns=fisher_columns), same)  # the Gram matrices see every window
    assert not first.df["output_fisher_error"].equals(every.df["output_fisher_error"])
    pd.testing.assert_frame_equal(_table(folder, calibration, 12).df, every.df)  # past the set: every window
    assert _table(folder, calibration, None).meta["fisher_samples"] == 8  # the default: a quarter, at least 8
    from quantplan.analysis.summary import summarize
    assert "gradients of the first 4 of 10 calibration windows" in summarize(first)


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
                    batch_size=2, fisher=True, fisher_samples=4)
    assert not every.df["output_fisher_error"].equals(expected.df["output_fisher_error"])
    assert expected.meta["fisher_samples"] == 2 and every.meta["fisher_samples"] == 4


def test_the_default_backpropagates_a_quarter_of_the_windows_and_at_least_eight():
    assert [default_windows(n) for n in (4, 8, 16, 32, 128)] == [4, 8, 8, 8, 32]


def test_run_reuses_a_table_only_with_the_same_fisher_windows(tmp_path, capsys):
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.pipeline import analyze_model

    folder = save_tiny(tmp_path / "model", layers=2)
    source = resolve_source(str(folder))
    config = AnalyzeConfig(samples=8, seq_len=16, fisher_samples=4, progress=False, formats="nf4")
    first = analyze_model(source, tmp_path / "out", config)  # 8 windows: the default backpropagates all
    assert first.meta["fisher_samples"] == 4
    again = analyze_model(source, tmp_path / "out", config, reuse=True)
    assert "reusing the matching sensitivity table" in capsys.readouterr().out
    assert again.meta["created"] == first.meta["created"]
    every = analyze_model(source, tmp_path / "out", AnalyzeConfig(samples=8, seq_len=16, progress=False,
                                                                  formats="nf4"), reuse=True)
    assert ("backpropagated 4 calibration windows and this run asks for 8: pass --fisher-samples 4 to reuse it"
            in capsys.readouterr().out)
    assert every.meta["fisher_samples"] == 8


@pytest.mark.parametrize("fisher", [False, True])
def test_forward_only_batches_pass_no_labels(fisher):
    """A forward that keeps one position's logits must not make a loss over every label (PaliGemma crashed there)."""
    from tiny import tiny_llama

    model, seen = tiny_llama(tie=True), []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    analyze(model, LabelledCalibration(random_calibration(samples=8)), [NF4], progress=False, batch_size=4, fisher=fisher,
            fisher_samples=4 if fisher else None)
    assert seen and not any("labels" in keys for keys in seen)  # batch 1 ran forward only, both ways


@pytest.mark.parametrize("fisher", [False, True])
def test_a_measured_head_makes_no_logits_in_forward_only_batches(fisher):
    """An untied lm_head is measured from its input: a forward-only batch shows the probe the base model's last
    hidden state and makes no batch × vocabulary logits (the Fisher batches make them in token chunks)."""
    from tiny import tiny_llama

    model, rows = tiny_llama(tie=False), []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[:-1].numel()))
    table = analyze(model, random_calibration(samples=8), [NF4], progress=False, batch_size=4, fisher=fisher,
                    fisher_samples=4 if fisher else None).df.set_index("name")
    # batch 1 runs forward only and makes none; the Fisher batch 0 makes its logits in the head's token chunks, one
    # chunk for this tiny head (the old forward made batch 1's whole, 128 rows, in both modes)
    assert rows == ([4 * 32] if fisher else [])
    assert table.loc["lm_head", "tokens"] == 8 * 32 and table.loc["lm_head", "output_rel_error"] > 0


def test_image_batches_split_by_shape_count_their_pairs(tmp_path):
    """The shipped photos' prompts differ in length, so an image set's batches hold one pair each: the Fisher
    windows are counted from the batches as they are made, not from --batch-size."""
    from vlm_models import save_tiny_vlm

    from quantplan.analysis import load_processor
    from quantplan.analysis.fisher_windows import BackwardShare, batch_windows
    from quantplan.analysis.vision import load_image_calibration

    folder = save_tiny_vlm("llava", tmp_path / "llava")
    calibration = load_image_calibration(load_processor(resolve_source(str(folder))), "default", samples=6)
    assert batch_windows(calibration, 4) == [1] * 6
    assert backward_share(calibration, 4, 3) == BackwardShare(batches=3, windows=3)
    assert batch_windows(random_calibration(samples=10), 4) == [4, 4, 2]


def test_a_partial_state_saved_before_the_option_resumes_only_with_every_window(tmp_path, monkeypatch):
    """A state without ``fisher_batches`` ran every batch backward: --resume continues it with --fisher-samples at
    least --samples, and names that fix otherwise."""
    import json

    from quantplan.analysis import TableMismatch
    from quantplan.analysis.analyze import PARTIAL_DIR

    folder = save_tiny(tmp_path / "model", layers=2)
    calibration = random_calibration(samples=8)
    out = tmp_path / "out"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    import importlib
    analyze_module = importlib.import_module("quantplan.analysis.analyze")
    original = analyze_module.measure_module
    monkeypatch.setattr(analyze_module, "measure_module", stop)  # the pass is saved, then the measurement stops
    with pytest.raises(KeyboardInterrupt):
        _table(folder, calibration, None, out_dir=out, checkpoint_seconds=0)
    monkeypatch.setattr(analyze_module, "measure_module", original)
    state_file = out / PARTIAL_DIR / "state.json"
    state = json.loads(state_file.read_text())
    del state["fisher_batches"]  # as saved before this option
    state_file.write_text(json.dumps(state))
    with pytest.raises(TableMismatch, match="--fisher-samples N with N at least --samples"):
        _table(folder, calibration, 4, out_dir=out, resume=True)
    resumed = _table(folder, calibration, 8, out_dir=out, resume=True)
    pd.testing.assert_frame_equal(resumed.df, _table(folder, calibration, 8).df)


def test_cli_refuses_fisher_samples_it_cannot_use(tiny_dir, tmp_path, capsys):
    from quantplan.cli import main

    assert main(["analyze", str(tiny_dir), "--out", str(tmp_path / "t"), "--no-fisher", "--fisher-samples", "4"]) == 2
    assert "--no-fisher skips: drop one of the two" in capsys.readouterr().err
    assert main(["analyze", str(tiny_dir), "--out", str(tmp_path / "t"), "--fisher-samples", "0"]) == 2
    assert "give at least 1 calibration window" in capsys.readouterr().err


def test_a_module_no_backward_batch_ran_has_no_fisher_weight_rather_than_zero():
    """Zeros say "its output feeds nothing the loss reads", which a module shows only by running in a backward batch
    without a gradient reaching it; one that ran only in forward-only batches is unknown (None), also after a resume."""
    from types import SimpleNamespace

    import torch

    from quantplan.analysis.fisher import GradientProbe, fisher_weights

    grads = GradientProbe(torch.nn.Identity(), ["unreached", "later"])
    grads.ran.add("unreached")
    stats = SimpleNamespace(tokens=64)
    assert torch.equal(fisher_weights(grads, "unreached", 3, stats), torch.zeros(3))
    assert fisher_weights(grads, "later", 3, stats) is None
    resumed = GradientProbe(torch.nn.Identity(), ["unreached", "later"])
    resumed.load_state(grads.state())
    assert resumed.ran == {"unreached"}


def test_a_state_saved_before_the_ran_record_resumes_with_every_measured_module_ran(tmp_path, monkeypatch):
    """Such a state backpropagated every batch: each module with input statistics ran in a backward batch, so one no
    gradient reached keeps its zero Fisher weight after --resume (LLaVA's unreached vision layer)."""
    import importlib
    import json

    from safetensors.torch import load_file, save_file

    from quantplan.analysis.analyze import PARTIAL_DIR
    from quantplan.analysis.fisher import GradientProbe
    from quantplan.analysis.partial_state import resume_state
    from quantplan.analysis.probe import InputProbe

    folder = save_tiny(tmp_path / "model", layers=2)
    calibration, out = random_calibration(samples=8), tmp_path / "out"
    analyze_module = importlib.import_module("quantplan.analysis.analyze")
    monkeypatch.setattr(analyze_module, "measure_module", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _table(folder, calibration, 8, out_dir=out, checkpoint_seconds=0)
    partial = out / PARTIAL_DIR
    state = json.loads((partial / "state.json").read_text())
    tensor_file = partial / state.get("tensors", "state.safetensors")
    tensors = load_file(str(tensor_file))
    assert any(k.endswith("::gradran") for k in tensors)
    save_file({k: v for k, v in tensors.items() if not k.endswith("::gradran")}, str(tensor_file))
    model = load_model(resolve_source(str(folder)))
    names = sorted(state["candidates"])
    probe, grads = InputProbe(model, names), GradientProbe(model, names)
    run_meta = {k: state.get(k) for k in ("model_fingerprint", "calibration", "formats", "batch_size", "candidates",
                                          "fisher", "fisher_batches", "equalization")}
    resume_state(probe, grads, partial, run_meta, total_batches=2)
    assert grads.ran == set(names)
