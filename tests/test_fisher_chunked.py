"""The in-memory Fisher pass with the head in token chunks (analysis/stream_head.chunked_loss_backward)."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.stream_head import plain_head, refuse_logit_transforms
from quantplan.analysis.stream_weights import StreamingUnsupported

analyze_module = importlib.import_module("quantplan.analysis.analyze")
stream_head = importlib.import_module("quantplan.analysis.stream_head")


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_head_gives_the_whole_batch_table(monkeypatch, tie):
    """Same Fisher table, every column (lm_head's input sample included), as the whole-batch loss, in many chunks."""
    model = tiny_llama(layers=2, tie=tie, vocab=512)
    calibration = random_calibration(samples=6, vocab=512)
    assert plain_head(model)
    monkeypatch.setattr(stream_head, "MIN_CHUNK_BYTES", 0)  # chunks of the head's weight bytes: 4 tokens here
    chunked = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
    monkeypatch.setattr(analyze_module, "plain_head", lambda model: False)
    whole = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=True)
    assert chunked.df["output_fisher_error"].notna().sum() > 0
    pd.testing.assert_frame_equal(chunked.df, whole.df, rtol=1e-5)


def test_no_batch_times_vocabulary_logits_in_memory(monkeypatch):
    """The loss sees at most one chunk of tokens at a time, never the batch's 4 x 32 rows of logits; in memory a
    chunk gets at least MIN_CHUNK_BYTES of work space (fewer kernel launches where the head is small)."""
    model = tiny_llama(layers=1, vocab=8192)
    rows = []
    gradient = stream_head.sampled_loss_gradient

    def recording(logits, *args, **kwargs):
        rows.append(logits.reshape(-1, logits.shape[-1]).shape[0])
        return gradient(logits, *args, **kwargs)

    monkeypatch.setattr(stream_head, "sampled_loss_gradient", recording)
    monkeypatch.setattr(stream_head, "MIN_CHUNK_BYTES", 0)  # chunks of the head's weight bytes, as streamed
    analyze(model, random_calibration(samples=4, vocab=8192), [NF4], batch_size=4, progress=False, fisher=True)
    chunk = 64 * model.lm_head.weight.element_size() // 32  # the head's weight bytes / (vocabulary x 32 B per logit)
    assert rows and max(rows) == chunk and sum(rows) == 4 * 32
    rows.clear()
    monkeypatch.setattr(stream_head, "MIN_CHUNK_BYTES", 8192 * 32 * 16)  # in memory: at least 16 tokens a chunk
    analyze(model, random_calibration(samples=4, vocab=8192), [NF4], batch_size=4, progress=False, fisher=True)
    assert max(rows) == 16 and sum(rows) == 4 * 32


@pytest.mark.parametrize(("setting", "value"), [("final_logit_softcapping", 30.0), ("lm_head_multiplier", 0.04),
                                              ("unpadded_vocab_size", 200)])
def test_a_head_that_changes_its_logits_keeps_the_whole_batch_loss_and_does_not_stream(setting, value):
    """Gemma-2's soft-capping, Falcon-H1's muP multiplier, Inkling's cut to the real vocabulary: after lm_head."""
    model = tiny_llama(layers=1)
    setattr(model.config, setting, value)
    assert not plain_head(model)
    with pytest.raises(StreamingUnsupported, match=f"{setting}={value}.*without --max-memory"):
        refuse_logit_transforms(model)
    setattr(model.config, setting, None)
    assert plain_head(model)
    refuse_logit_transforms(model)


def test_sampled_loss_gradient_is_the_cross_entropy_gradient():
    """(softmax − onehot(sampled target)) / tokens is autograd's gradient of the summed cross entropy / tokens."""
    from quantplan.analysis.fisher import sample_targets, sampled_loss_gradient, sampling_uniforms

    logits = torch.randn(40, 300, dtype=torch.float64) * 4
    uniforms = sampling_uniforms(40, "cpu", seed=3)
    leaf = logits.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(leaf, sample_targets(logits, uniforms), reduction="sum") / 100
    loss.backward()
    torch.testing.assert_close(sampled_loss_gradient(logits, uniforms, 100), leaf.grad)
