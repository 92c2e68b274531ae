"""The analysis' calibration pass keeps the 16-bit last hidden states the verification reads (analysis/kept_hidden.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny import random_calibration, save_tiny_english, tiny_llama

from quantplan.analysis import NF4, analyze, resolve_source
from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.endtoend import restore_gains
from quantplan.analysis.head_chunks import base_hidden
from quantplan.analysis.kept_hidden import KeptHidden
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache
from quantplan.endtoend import EndToEnd
from quantplan.pipeline import analyze_model, verified_batches
from quantplan.planner.config import PlanConfig
from quantplan.shared_model import SharedModel

micro = importlib.import_module("quantplan.analysis.micro_batches")


def _base_calls(model) -> list[int]:
    """One entry per forward of the model's base model (filled while hooked)."""
    calls: list[int] = []
    model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


@pytest.mark.parametrize("fisher", [False, True])
def test_the_pass_keeps_the_first_batches_whole_batch_states(monkeypatch, fisher):
    """Kept for batches 0 and 1 only, each the state a whole-batch 16-bit forward gives, though the Fisher pass
    ran one sequence at a time."""
    model = tiny_llama(layers=2).float()
    calibration = random_calibration(samples=10)
    monkeypatch.setattr(micro, "CPU_ACTIVATION_BUDGET", 1)  # one sequence per base forward
    kept = KeptHidden(batches=2)
    analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=fisher, hidden=kept)
    assert sorted(kept.states) == [0, 1]
    assert (kept.batch_size, kept.calibration) == (4, calibration.fingerprint)
    for index, batch in zip(range(2), calibration.batches(4), strict=False):
        with torch.inference_mode():
            whole = base_hidden(model, batch)
        assert kept.states[index].shape == whole.shape == (4, 32, 64)
        torch.testing.assert_close(kept.states[index], whole, rtol=1e-5, atol=1e-6)
        assert not kept.states[index].requires_grad


def test_nothing_is_kept_where_the_logits_change_after_lm_head():
    model = tiny_llama(layers=2).float()
    model.config.final_logit_softcapping = 30.0  # the comparison then runs whole forwards: no state to lend
    kept = KeptHidden(batches=None)
    analyze(model, random_calibration(samples=4), [NF4], batch_size=4, progress=False, hidden=kept)
    assert kept.states == {}


def test_states_are_lent_only_to_a_reference_over_the_same_batches():
    model = tiny_llama(layers=2).float()
    calibration = random_calibration(samples=8)
    kept = KeptHidden(batches=None)
    analyze(model, calibration, [NF4], batch_size=4, progress=False, hidden=kept)
    assert sorted(kept.states) == [0, 1]
    assert kept.lend(KLReference(model, calibration, batch_size=2), calibration) == 0  # other batches
    other = random_calibration(samples=8, seed=1)
    assert kept.lend(KLReference(model, other, batch_size=4), other) == 0  # other tokens
    reference = KLReference(model, calibration, batch_size=4, max_batches=1)
    assert kept.lend(reference, calibration) == 1
    assert reference.has_hidden16(0) and not reference.has_hidden16(1)


def _with_and_without_lent_states(tmp_path, end_to_end: EndToEnd, budget: str, **config):
    """On the tiny English model: (the plan with the analysis' 16-bit states lent, the plan with the end-to-end steps'
    own 16-bit runs, the base forwards the lent states saved, the run's SharedModel, the batches the analysis kept)."""
    source = resolve_source(str(save_tiny_english(tmp_path / "model", layers=2)))
    analyze_config = AnalyzeConfig(samples=8, seq_len=32, dtype="fp32", progress=False, **config)
    shared = SharedModel(source, "fp32", "cpu", hidden=KeptHidden(verified_batches(end_to_end, analyze_config)))
    table = analyze_model(source, tmp_path / "job", analyze_config, shared=shared)
    kept = sorted(shared.hidden.states)
    calls = _base_calls(shared.get())
    lent = end_to_end.plan(source, analyze_config, table, budget, PlanConfig(), shared=shared)
    with_states = len(calls)
    shared.hidden.clear()
    calls.clear()
    own = end_to_end.plan(source, analyze_config, table, budget, PlanConfig(), shared=shared)
    return lent, own, len(calls) - with_states, shared, kept


def test_the_verification_skips_its_16bit_run_on_lent_states(tmp_path):
    """Same verification KLs with the analysis' states as with its own 16-bit run, one base forward a batch fewer."""
    lent, own, saved, shared, kept = _with_and_without_lent_states(tmp_path, EndToEnd(max_batches=2, refine=0), "+0%")
    assert kept == [0, 1]
    assert saved == 2  # the 16-bit run of each of the 2 batches
    assert lent.checks.verification.calibration_kld == pytest.approx(own.checks.verification.calibration_kld,
                                                                       rel=1e-6)
    assert shared.loads == 1


def test_the_refinement_and_its_held_back_choice_read_lent_states(tmp_path):
    """``--refine``: the same refined plan and held-back KLs with the analysis' states as without, and the held-back
    batches do not run the 16-bit base model again."""
    lent, own, saved, _, kept = _with_and_without_lent_states(tmp_path, EndToEnd(max_batches=2, refine=1), "+30%",
                                                              batch_size=2)
    assert kept == [0, 1, 2, 3]  # 2 refined and verified on, 2 held back
    assert saved == 2 + 2  # the verification's and the held-back batches' 16-bit runs
    assert lent.choices == own.choices
    ours, theirs = lent.checks.refinement, own.checks.refinement
    assert ours.heldback_kld == pytest.approx(theirs.heldback_kld, rel=1e-6)
    assert ours.shipped == theirs.shipped


def test_the_refinement_rounds_read_kept_states_not_a_16bit_forward():
    """restore_gains reads the 16-bit last hidden states where they are kept: the same gains, one base forward a batch
    fewer."""
    model = tiny_llama(layers=2).float()
    calibration = random_calibration(samples=4)
    cache = QuantCache(model, NF4)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    calls = _base_calls(model)
    own = restore_gains(model, KLReference(model, calibration, batch_size=2), cache, names)
    forwards = len(calls)
    reference = KLReference(model, calibration, batch_size=2)
    for index, batch in enumerate(reference.batches()):
        with torch.inference_mode():
            reference.keep_hidden16(index, base_hidden(model, batch))
    calls.clear()
    kept = restore_gains(model, reference, cache, names)
    assert forwards - len(calls) == 2  # one 16-bit forward per batch
    assert kept.kld == pytest.approx(own.kld, rel=1e-6)
    assert kept.gains == pytest.approx(own.gains, rel=1e-5)


def test_a_run_keeps_the_batches_its_end_to_end_steps_read():
    config = AnalyzeConfig(samples=32, seq_len=256, batch_size=4)
    assert verified_batches(EndToEnd(), config) == 8  # 4096 tokens of 4 x 256, as many held back (automatic refinement)
    assert verified_batches(EndToEnd(refine=0), config) == 4  # no refinement: the verification's only
    assert verified_batches(EndToEnd(max_batches=3), config) == 6
    assert verified_batches(EndToEnd(refine=2, verify=False), config) == 4  # no verification: no held-back choice
    assert verified_batches(EndToEnd(verify=False, refine=0), config) == 0
