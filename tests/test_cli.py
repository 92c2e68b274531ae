"""The quantplan command as a newcomer meets it: early errors, one-line warnings and interrupts, quiet, --help."""

from __future__ import annotations

import argparse
import importlib
import json
import logging

import pytest

from quantplan.cli import _parser, main

pipeline = importlib.import_module("quantplan.pipeline")
analyze_module = importlib.import_module("quantplan.analysis.analyze")


@pytest.fixture
def words(tmp_path):
    """A small word corpus the tiny model's tokenizer reads."""
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(" ".join(f"w{(i * 13 + j) % 250 + 3}" for j in range(40)) for i in range(40)))
    return str(path)


def _quick(words: str) -> list[str]:
    return ["--calib", words, "--samples", "4", "--seq-len", "16", "--batch-size", "2", "--no-fisher", "--quiet"]


def _no_analysis(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was analyzed before the budget was checked")

    monkeypatch.setattr(pipeline, "analyze_model", refuse)
    monkeypatch.setattr(pipeline, "load_model", refuse)


def test_malformed_budget_fails_before_any_model_is_loaded(tiny_dir, tmp_path, monkeypatch, capsys):
    _no_analysis(monkeypatch)
    assert main(["run", str(tiny_dir), "--budget", "lots", "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read budget 'lots'" in err[0]
    assert not (tmp_path / "job").exists()


def test_budget_below_all_4bit_fails_before_the_calibration_pass(tiny_dir, tmp_path, monkeypatch, words, capsys):
    _no_analysis(monkeypatch)
    code = main(["run", str(tiny_dir), "--budget", "10kB", "--out", str(tmp_path / "job"), *_quick(words)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below this model's all-4-bit size" in err[0] and "raise the budget" in err[0]


def test_budget_above_16bit_is_one_warning_line_saying_plain_16bit(tiny_dir, tmp_path, words, capsys):
    code = main(["run", str(tiny_dir), "--budget", "10GB", "--out", str(tmp_path / "job"), "--no-compare",
                 "--no-verify", *_quick(words)])
    assert code == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("quantplan: warning:")
    assert "plain 16-bit checkpoint" in warnings[0]
    assert "UserWarning" not in err and ".py:" not in err
    config = json.loads((tmp_path / "job" / "checkpoint" / "config.json").read_text())
    assert "quantization_config" not in config  # as the warning says (it held a bnb config skipping every module)
    assert "**This checkpoint is plain 16-bit:**" in (tmp_path / "job" / "checkpoint" / "README.md").read_text()


def _interrupt_after(monkeypatch, batches: int):
    """Ctrl-C once ``batches`` calibration batches have run."""
    seen = {"n": 0}
    original = analyze_module.InputProbe.start_batch

    def start_batch(self, *args):
        if seen["n"] == batches:
            raise KeyboardInterrupt
        seen["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(analyze_module.InputProbe, "start_batch", start_batch)


def test_ctrl_c_before_the_first_batch_says_nothing_was_saved(tiny_dir, tmp_path, monkeypatch, words, capsys):
    _interrupt_after(monkeypatch, 0)
    code = main(["analyze", str(tiny_dir), "--out", str(tmp_path / "t"), *_quick(words)])
    assert code == 130
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "interrupted" in line or "stopped" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("quantplan: interrupted: calibration pass stopped after 0/")
    assert "nothing was saved" in lines[0] and "re-run the same command" in lines[0]


def test_ctrl_c_later_says_once_what_was_saved_and_how_to_resume(tiny_dir, tmp_path, monkeypatch, words, capsys):
    _interrupt_after(monkeypatch, 1)
    code = main(["analyze", str(tiny_dir), "--out", str(tmp_path / "t"), *_quick(words)])
    assert code == 130
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("partial statistics saved") == 1
    assert "stopped after 1/" in text and "--resume" in text


def test_harmless_kernel_line_of_bitsandbytes_is_not_shown(caplog):
    from quantplan.common.noise import silence_library_noise

    silence_library_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("a real problem")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["a real problem"]


def test_quiet_hides_progress_bars_but_keeps_results(tiny_dir, tmp_path, words, capsys):
    code = main(["analyze", str(tiny_dir), "--out", str(tmp_path / "t"), *_quick(words)])
    assert code == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err and "it/s" not in captured.err
    assert "wrote" in captured.out and "sensitivity.parquet" in captured.out


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_is_grouped_with_defaults_and_an_example_per_command():
    parser = _parser()
    assert "``" not in parser.format_help()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert "example" in text, name
        assert "``" not in text, name
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
    run = " ".join(_subparsers(parser)["run"].format_help().split())
    for title in ("calibration data", "measurement", "performance and memory", "plan", "output", "report"):
        assert f"{title}" in run, title
    assert "(default: +10%)" in run
