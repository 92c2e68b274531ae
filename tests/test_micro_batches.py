"""The in-memory Fisher pass runs text batches a few sequences at a time (analysis/micro_batches.py)."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.estimate import estimate_peak
from quantplan.analysis.micro_batches import (
    micro_batches,
    sequence_activation_bytes,
    sequences_per_micro_batch,
    splittable,
)

micro = importlib.import_module("quantplan.analysis.micro_batches")
models = importlib.import_module("quantplan.analysis.models")


def _forward_sizes(model) -> list[int]:
    """The batch size of every forward of the model's base (filled while hooked)."""
    sizes: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(len(kwargs["input_ids"])),
                                          with_kwargs=True)
    return sizes


@pytest.mark.parametrize("tie", [False, True])
def test_one_sequence_at_a_time_gives_the_whole_batch_table(monkeypatch, tie):
    """Every column (Fisher sums, Gram matrices, the input sample, energies) as with whole batches of 4 and 2.

    Exactly with float32 Gram products; bf16 products (bf16 hardware: analysis.gram.product_dtype) round once per
    forward, so a split batch rounds more often: the same table to bf16 rounding."""
    model = tiny_llama(layers=2, tie=tie, vocab=512)
    calibration = random_calibration(samples=6, vocab=512)
    sizes = _forward_sizes(model)
    tables, budget = {}, micro.CPU_ACTIVATION_BUDGET
    for native_bf16 in (False, True):
        monkeypatch.setattr(models, "_cpu_computes_bf16", lambda native_bf16=native_bf16: native_bf16)
        monkeypatch.setattr(micro, "CPU_ACTIVATION_BUDGET", budget)
        sizes.clear()
        whole = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
        assert sizes == [4, 2]  # a tiny model's sequences fit the budget together
        sizes.clear()
        monkeypatch.setattr(micro, "CPU_ACTIVATION_BUDGET", 1)
        split = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
        assert sizes == [1] * 6
        assert split.df["output_fisher_error"].notna().sum() > 0
        tables[native_bf16] = (whole, split)
    whole, split = tables[False]
    pd.testing.assert_frame_equal(split.df, whole.df, rtol=1e-5)
    whole, split = tables[True]
    pd.testing.assert_frame_equal(split.df, whole.df, rtol=2e-3)


def test_the_budget_sets_how_many_sequences_run_together(monkeypatch):
    model = tiny_llama(layers=2)
    per_sequence = sequence_activation_bytes(model.config, 32)
    assert per_sequence == 2 * (32 * (64 * 8 + 128 * 4) * 4 + 4 * 32 * 32 * 4)  # two layers of the peak model
    assert sequences_per_micro_batch(model.config, 32, 3 * per_sequence - 1) == 2
    assert sequences_per_micro_batch(model.config, 32, 0) == 1  # at least one sequence
    monkeypatch.setattr(micro, "CPU_ACTIVATION_BUDGET", 2 * per_sequence)
    sizes = _forward_sizes(model)
    analyze(model, random_calibration(samples=5), [NF4], batch_size=4, progress=False, fisher=True)
    assert sizes == [2, 2, 1]


def test_a_batch_with_images_or_other_tensors_runs_whole():
    ids = torch.ones(4, 8, dtype=torch.long)
    assert splittable({"input_ids": ids, "attention_mask": torch.ones(4, 8)})
    for batch in ({"input_ids": ids, "pixel_values": torch.zeros(4, 3, 2, 2)},  # images need not follow sequences
                  {"input_ids": ids, "attention_mask": torch.ones(4, 7)}, {"input_ids": ids[0]}):
        assert not splittable(batch)
        assert [offset for offset, _ in micro_batches(batch, 1)] == [0]
    parts = list(micro_batches({"input_ids": ids, "attention_mask": torch.zeros(4, 8)}, 3))
    assert [(offset, len(part["input_ids"]), len(part["attention_mask"])) for offset, part in parts] == [(0, 3, 3),
                                                                                                        (24, 1, 1)]


def test_the_estimate_counts_one_micro_batch_of_activations(monkeypatch):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny_llama(layers=2)
    whole = estimate_peak(model, [NF4], dtype_bytes=4, batch_size=4, seq_len=32, fisher=True)
    monkeypatch.setattr(micro, "CPU_ACTIVATION_BUDGET", 1)
    monkeypatch.setattr(importlib.import_module("quantplan.analysis.estimate"), "CPU_ACTIVATION_BUDGET", 1)
    one = estimate_peak(model, [NF4], dtype_bytes=4, batch_size=4, seq_len=32, fisher=True)
    assert whole.activations - one.activations >= 3 * sequence_activation_bytes(model.config, 32)


def test_the_input_sample_is_the_first_batchs_however_it_comes():
    """Told the batch's rows, a probe samples from its micro-batches the rows it samples from the whole batch."""
    from quantplan.analysis.probe import InputProbe

    rows = torch.randn(2, 300, 6)
    rows[0, 5] = float("nan")  # a non-finite row is skipped and not counted
    samples = []
    for pieces, told in (([(0, 300)], None), ([(0, 7), (7, 100), (100, 300)], 300)):
        probe = InputProbe(torch.nn.Linear(6, 6), ["x"], sample_rows=50)
        for batch in rows:
            probe.start_batch(told)
            for start, stop in pieces:
                probe.observe("x", batch[start:stop])
            probe.commit_batch()
        samples.append(probe.stats["x"].sample)
    finite = torch.cat([rows[0, :5], rows[0, 6:]])
    torch.testing.assert_close(samples[0], finite[::6][:50], rtol=0, atol=0)  # 300 rows // 50: every 6th
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)
