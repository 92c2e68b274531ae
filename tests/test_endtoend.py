"""End-to-end probes: KL to the 16-bit model, quantized-context gains and output error (analysis.endtoend)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.endtoend import restore_gains
from quantplan.analysis.reference import KLReference, calibration_kld, model_kld
from quantplan.analysis.simulate import QuantCache


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=2, hidden=128, intermediate=256).float()
    calibration = random_calibration(samples=4, seq_len=32)
    reference = KLReference(model, calibration, batch_size=2)
    cache = QuantCache(model, NF4)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return model, calibration, reference, cache, names


def test_kld_is_zero_in_16bit_and_positive_quantized(setup):
    model, _, reference, cache, names = setup
    assert calibration_kld(reference, cache) == pytest.approx(0.0, abs=1e-6)
    quantized = calibration_kld(reference, cache, names)
    assert quantized > 1e-4
    assert not cache._originals  # the 16-bit weights are back
    assert calibration_kld(reference, cache) == pytest.approx(0.0, abs=1e-6)
    sixteen = KLReference(copy.deepcopy(model), reference.calibration, 2)
    with cache.quantized(names):  # the same KL measured against a second, 16-bit copy of the model
        assert model_kld(model, sixteen) == quantized
    assert restore_gains(model, reference, cache, names).kld == pytest.approx(quantized, rel=1e-4)


def test_gain_is_the_directional_derivative_of_the_kl(setup):
    """KL(Ŵ + ε(W−Ŵ) for one module) − KL(Ŵ) ≈ −ε · gain: the gain is a real first-order estimate."""
    model, _, reference, cache, names = setup
    result = restore_gains(model, reference, cache, names)
    ranked = sorted(names, key=lambda n: -abs(result.gains[n]))
    eps = 0.05
    sixteen = KLReference(copy.deepcopy(model), reference.calibration, 2)
    for name in ranked[:3]:
        with cache.quantized(names):
            base = model_kld(model, sixteen)
            weight = cache.modules[name].weight
            rounded = weight.data.clone()
            weight.data = rounded + eps * (cache.original(name) - rounded)
            moved = model_kld(model, sixteen)
            weight.data = rounded
        assert (base - moved) / eps == pytest.approx(result.gains[name], rel=0.1, abs=1e-5)
    assert sum(result.gains.values()) > 0  # restoring helps overall
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None  # nothing left behind
    assert not any(p.grad is not None for p in model.parameters())


def test_context_error_sees_upstream_rounding(setup):
    """Layer 0's inputs do not depend on any Linear: its context error equals the 16-bit output error;
    the last layer's inputs carry every upstream rounding, so there the two differ."""
    model, calibration, reference, cache, names = setup
    table = analyze(model, calibration, [NF4], batch_size=2, progress=False)
    local = table.for_format("nf4").set_index("name")["output_rel_error"]
    context = restore_gains(model, reference, cache, names, context_error=True).context_error
    first = "model.layers.0.self_attn.q_proj"
    assert context[first] == pytest.approx(local[first], rel=1e-3)
    last = "model.layers.1.mlp.down_proj"
    assert context[last] != pytest.approx(local[last], rel=1e-3)


def test_max_batches_bounds_the_reference(setup):
    model, calibration, *_ = setup
    reference = KLReference(model, calibration, batch_size=2, max_batches=1)
    assert reference.count == 1 and len(list(reference.batches())) == 1 and reference.tokens == 2 * 32


@pytest.mark.parametrize(("end_to_end", "samples", "seq_len", "batches"), [
    ({}, 32, 256, 4),  # the default job: 4096 of its 8192 calibration tokens
    ({}, 8, 128, 8),  # a small calibration set: every batch it has (KLReference takes min(total, 8))
    ({}, 4, 8192, 1),  # windows longer than the bound: one batch
    ({"max_batches": 3}, 32, 256, 3),  # --end-to-end-batches 3
    ({"max_tokens": None}, 32, 256, None),  # --end-to-end-batches all
])
def test_end_to_end_steps_run_on_the_first_tokens_by_default(end_to_end, samples, seq_len, batches):
    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.endtoend import EndToEnd

    assert EndToEnd(**end_to_end).batches(AnalyzeConfig(samples=samples, seq_len=seq_len)) == batches


@pytest.mark.parametrize(("flag", "expected"), [
    ([], {}), (["--end-to-end-batches", "2"], {"max_batches": 2}),
    (["--end-to-end-batches", "all"], {"max_batches": None, "max_tokens": None})])
def test_end_to_end_batches_flag(flag, expected):
    from quantplan.cli import _end_to_end_batches, _parser

    args = _parser().parse_args(["run", *flag])
    assert _end_to_end_batches(args.end_to_end_batches) == expected
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--end-to-end-batches", "0"])


def test_gains_with_the_head_in_token_chunks_equal_whole_batch_logits(setup, monkeypatch):
    """A plain head runs in token chunks against the 16-bit hidden states: the same KL and gains as whole logits."""
    import quantplan.analysis.endtoend as endtoend

    model, calibration, _, cache, names = setup
    monkeypatch.setattr(endtoend, "chunk_size", lambda model: 7)  # several chunks a batch, one across two windows
    chunked = restore_gains(model, KLReference(model, calibration, 2), cache, names, context_error=True)
    monkeypatch.setattr(endtoend, "plain_head", lambda model: False)
    whole = restore_gains(model, KLReference(model, calibration, 2), cache, names, context_error=True)
    assert chunked.kld == pytest.approx(whole.kld, rel=1e-4)  # float32 sums in another order
    assert chunked.gains == pytest.approx(whole.gains, rel=1e-4, abs=1e-9)
    assert chunked.context_error == pytest.approx(whole.context_error, rel=1e-5)


def test_gains_in_micro_batches_of_sequences_equal_whole_batches(setup, monkeypatch):
    """One sequence at a time (a tiny activation budget), the same KL, gains and context errors as whole batches."""
    import quantplan.analysis.endtoend as endtoend

    model, calibration, _, cache, names = setup
    whole = restore_gains(model, KLReference(model, calibration, 2), cache, names, context_error=True)
    monkeypatch.setattr(endtoend, "activation_budget", lambda device: 1)
    parts = restore_gains(model, KLReference(model, calibration, 2), cache, names, context_error=True)
    assert parts.kld == pytest.approx(whole.kld, rel=1e-4)  # float32 sums in another order
    assert parts.gains == pytest.approx(whole.gains, rel=1e-4, abs=1e-9)
    assert parts.context_error == pytest.approx(whole.context_error, rel=1e-5)


def test_gains_of_the_head_alone_quantized(setup, monkeypatch):
    """Only lm_head quantized (a refinement's last round): the body has no graph to backpropagate into; the head's
    gain is the one whole logits give."""
    import quantplan.analysis.endtoend as endtoend

    model, calibration, _, cache, _ = setup
    monkeypatch.setattr(endtoend, "chunk_size", lambda model: 7)
    chunked = restore_gains(model, KLReference(model, calibration, 2), cache, ["lm_head"])
    monkeypatch.setattr(endtoend, "plain_head", lambda model: False)
    whole = restore_gains(model, KLReference(model, calibration, 2), cache, ["lm_head"])
    assert chunked.kld == pytest.approx(whole.kld, rel=1e-4) and chunked.kld > 0
    assert chunked.gains["lm_head"] == pytest.approx(whole.gains["lm_head"], rel=1e-4)
    assert chunked.gains["lm_head"] > 0


def test_the_heads_gradient_is_folded_once_per_batch_not_once_per_chunk(setup, monkeypatch):
    """A quantized lm_head's weight gradient arrives once per chunk of tokens; it accumulates over the batch and is
    folded once (each fold reads the whole vocabulary × hidden weight and de-quantizes every menu entry), with the
    gains and menu moves of folding every chunk."""
    import contextlib

    import quantplan.analysis.endtoend as endtoend
    from quantplan.analysis.formats import NF4_BS32

    model, calibration, _, cache, names = setup
    monkeypatch.setattr(endtoend, "chunk_size", lambda model: 7)  # 64 tokens a batch: 10 chunks
    reads = []  # de-quantized lm_head weights: one per fold per other menu entry (and a few per batch and pass besides)
    restored = cache.restored
    monkeypatch.setattr(cache, "restored", lambda name, fmt=None: reads.append(name) or restored(name, fmt))
    quantized, menu = [*names, "lm_head"], {"nf4": NF4, "nf4-bs32": NF4_BS32}
    once = restore_gains(model, KLReference(model, calibration, 2), cache, quantized, menu=menu)
    read_once = reads.count("lm_head")
    monkeypatch.setattr(endtoend.GainSums, "one_fold", lambda self, cache, name: contextlib.nullcontext())
    reads.clear()
    every = restore_gains(model, KLReference(model, calibration, 2), cache, quantized, menu=menu)
    assert reads.count("lm_head") - read_once == 2 * 10 - 2  # 2 batches: a fold per chunk, not one per batch
    assert once.gains == pytest.approx(every.gains, rel=1e-4, abs=1e-9)
    for name in quantized:
        assert once.moves[name]["nf4-bs32"].gain == pytest.approx(every.moves[name]["nf4-bs32"].gain, rel=1e-4,
                                                                 abs=1e-9)
    assert model.lm_head.weight.grad is None  # folded and freed


def test_a_pass_keeps_no_cache_of_a_finished_stage(setup):
    """The running sums hold no gradient hook beyond the stage that registered it: a streamed pass makes one cache
    per block, each holding its packed weights, and only the running block's may stay alive."""
    import gc
    import weakref

    from quantplan.analysis.endtoend import GainSums

    model, _, _, _, names = setup
    sums = GainSums([*names, "lm_head"], menu={"nf4": NF4})
    stage = QuantCache(model, NF4)
    sums.folds(stage, names)
    with sums.one_fold(stage, "lm_head"):
        pass
    alive = weakref.ref(stage)
    del stage
    gc.collect()
    assert alive() is None
