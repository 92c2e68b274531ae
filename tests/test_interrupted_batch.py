"""In-memory analyze(): batches add straight into the Gram totals, yet no saved state holds part of a batch.

Ctrl-C or SIGTERM midway lets the batch finish, saves, then stops; a second Ctrl-C or an error midway keeps
the last flush; every resume gives the uninterrupted table. The pass allocates one Gram matrix per input.
"""

from __future__ import annotations

import importlib
import json
import os
import signal

import pandas as pd
import pytest
import torch
from tiny import random_calibration, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from quantplan.analysis import NF4, analyze
from quantplan.analysis.gram import upper_elements
from quantplan.analysis.interrupts import InterruptNow
from quantplan.analysis.probe import InputProbe

analyze_module = importlib.import_module("quantplan.analysis.analyze")
BATCH, SEQ = 2, 24  # 48 tokens a batch: no activation is as wide as it is long (see test_one_gram_per_input)


class AtBatch:
    """A forward hook that calls ``act`` when its module runs in the ``batch``-th batch (1-based)."""

    def __init__(self, batch: int, act):
        self.calls, self.batch, self.act = 0, batch, act

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.batch:
            self.act()


def _send(number):
    return lambda: os.kill(os.getpid(), number)


def _fail():
    raise RuntimeError("simulated CUDA out of memory")


def _run(model, out, **kwargs):
    return analyze(model, random_calibration(samples=12, seq_len=SEQ), [NF4], progress=False, batch_size=BATCH,
                   out_dir=out, **kwargs)


def _state(out) -> dict:
    return json.loads((out / "partial" / "state.json").read_text())


def _assert_resumes_to_uninterrupted(out, fisher=False):
    resumed = _run(tiny_llama(), out, resume=True, fisher=fisher)
    expected = analyze(tiny_llama(), random_calibration(samples=12, seq_len=SEQ), [NF4], progress=False,
                       batch_size=BATCH, fisher=fisher)
    pd.testing.assert_frame_equal(resumed.df, expected.df)
    assert not (out / "partial").exists()


@pytest.mark.parametrize(("number", "fisher"), [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_midway_finishes_the_batch_saves_and_resumes(tmp_path, capfd, number, fisher):
    model = tiny_llama()
    model.model.layers[0].register_forward_hook(AtBatch(3, _send(number)))
    second = AtBatch(3, lambda: None)
    model.model.layers[1].register_forward_hook(second)
    with pytest.raises(KeyboardInterrupt, match="stopped after 3/6 batches; partial statistics saved.*--resume"):
        _run(model, tmp_path, checkpoint_seconds=1e9, fisher=fisher)  # no periodic flush: only the stop saves
    assert second.calls == 3  # the rest of the batch ran after the signal
    assert _state(tmp_path)["batches_done"] == 3
    assert "stopping after the running batch" in capfd.readouterr().err
    assert signal.getsignal(number) in (signal.default_int_handler, signal.SIG_DFL)  # the handlers are put back
    _assert_resumes_to_uninterrupted(tmp_path, fisher)


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_flush(tmp_path):
    model = tiny_llama()
    model.model.layers[0].register_forward_hook(AtBatch(4, _send(signal.SIGINT)))
    model.model.layers[1].register_forward_hook(AtBatch(4, _send(signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt, match=r"during batch 4/6.*nothing new was saved.*after batch 3") as caught:
        _run(model, tmp_path, checkpoint_seconds=0)  # a flush after every batch
    assert isinstance(caught.value.__cause__, InterruptNow)
    assert _state(tmp_path)["batches_done"] == 3
    _assert_resumes_to_uninterrupted(tmp_path)


def test_an_error_midway_keeps_the_last_flush_whole(tmp_path, capsys):
    model = tiny_llama()
    model.model.layers[1].register_forward_hook(AtBatch(4, _fail))
    with pytest.raises(RuntimeError, match="simulated"):
        _run(model, tmp_path, checkpoint_seconds=0)
    said = capsys.readouterr().out
    assert "during batch 4/6" in said and "nothing new was saved" in said and "--resume" in said
    assert "after batch 3" in said
    state = _state(tmp_path)
    assert state["batches_done"] == 3
    assert {tokens for tokens, *_ in state["counts"].values()} == {3 * BATCH * SEQ}  # no token of batch 4
    _assert_resumes_to_uninterrupted(tmp_path)


def test_an_error_midway_before_any_flush_saves_nothing(tmp_path):
    model = tiny_llama()
    model.model.layers[1].register_forward_hook(AtBatch(2, _fail))
    with pytest.raises(RuntimeError, match="simulated"):
        _run(model, tmp_path, checkpoint_seconds=1e9)
    assert not (tmp_path / "partial" / "state.json").exists()


def test_a_probe_refuses_to_save_inside_a_batch(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    probe = InputProbe(model, ["0"])
    with probe.attached():
        probe.start_batch()
        model(torch.randn(4, 8))
        with pytest.raises(RuntimeError, match="part of a running batch"):
            probe.save(tmp_path, {})
        probe.commit_batch()
    probe.save(tmp_path, {})
    assert json.loads((tmp_path / "state.json").read_text())["counts"]["0"][0] == 4


class SquareAllocations(TorchDispatchMode):
    """Counts new float32 Gram-sized tensors (not views, not an input written in place) for the widths ``w``: a
    full [w, w] matrix or a flat buffer of its upper blocks."""

    def __init__(self, widths):
        super().__init__()
        self.widths, self.count = set(widths), 0
        self.flat = {upper_elements(w) for w in widths}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t._is_view()
                    and t.untyped_storage().data_ptr() not in given and self._gram_sized(t)):
                self.count += 1
        return out

    def _gram_sized(self, t: torch.Tensor) -> bool:
        if t.dim() == 1:
            return t.numel() in self.flat
        return t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] in self.widths


def test_one_gram_per_input_and_no_second_copy(monkeypatch):
    """The in-memory pass allocates each input's Gram matrix once: no pending copy a batch fills."""
    model = tiny_llama()
    seen = {}
    original = analyze_module._run_calibration

    def counted(model, calibration, probe, *args, **kwargs):
        with SquareAllocations({64, 128}) as mode:
            original(model, calibration, probe, *args, **kwargs)
        seen.update(allocations=mode.count, inputs=len(probe.stats))
        assert not any(hasattr(s, "pending") for s in probe.stats.values())

    monkeypatch.setattr(analyze_module, "_run_calibration", counted)
    analyze(model, random_calibration(samples=6, seq_len=SEQ), [NF4], progress=False, batch_size=BATCH)
    assert seen["inputs"] == 9  # per layer q/k/v, o, gate/up, down; and the lm_head
    assert seen["allocations"] == seen["inputs"]


def test_an_ignored_ctrl_c_stays_ignored(tmp_path):
    """A run started in the background (``nohup``, ``&`` without job control) ignores SIGINT: the pass must not
    install its handler over that, so a Ctrl-C meant for the terminal's foreground job does not stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the suite's fixture restores Ctrl-C afterwards
    model = tiny_llama()
    model.model.layers[0].register_forward_hook(AtBatch(2, _send(signal.SIGINT)))
    table = analyze(model, random_calibration(samples=6), [NF4], batch_size=BATCH, out_dir=tmp_path,
                    checkpoint_seconds=1e9, progress=False)
    assert len(table.df) and not (tmp_path / "partial").exists()  # ran to the end
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
