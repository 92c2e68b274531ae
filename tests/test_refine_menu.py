"""The refinement over the blocksize menu: per-format gains from one gradient, the plan's context, the rounds."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import INT8, NF4, analyze
from quantplan.analysis.endtoend import Move, restore_gains
from quantplan.analysis.formats import NF4_BS32
from quantplan.analysis.reference import InMemoryKLs, KLReference, forward_logits, kl_sum, model_kld
from quantplan.analysis.simulate import QuantCache
from quantplan.planner import KEEP, plan
from quantplan.planner import refine as refine_module
from quantplan.planner.config import PlanConfig
from quantplan.planner.refine import refine
from quantplan.planner.refine_scores import menu_scores, move_score

MENU = {"nf4": NF4, "nf4-bs32": NF4_BS32}


@pytest.fixture(scope="module")
def job():
    model = tiny_llama(layers=3, hidden=128, intermediate=256).float()
    calibration = random_calibration(samples=8, seq_len=32)
    table = analyze(model, calibration, list(MENU.values()), batch_size=4, progress=False, fisher=True)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return model, calibration, table, names


def shared_of(model, calibration) -> dict:
    return {"reference": KLReference(model, calibration, 4), "cache": QuantCache(model, NF4), "progress": False}


def mixed(names) -> dict:
    """Every other module at blocksize 32, the rest at 64."""
    return {n: NF4_BS32 if i % 2 else NF4 for i, n in enumerate(names)}


def gradient(model, reference, cache, names, formats, name) -> torch.Tensor:
    """∂KL/∂W of one module in the quantized context, by plain autograd (what the hooks fold)."""
    weight = cache.modules[name].weight
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    weight.requires_grad_(True)
    try:
        for batch in reference.batches():
            logits16 = reference.logits16(batch)  # with the 16-bit weights
            with cache.quantized(names, formats), torch.enable_grad():
                (kl_sum(logits16, forward_logits(model, batch), batch) / reference.tokens).backward()
        return weight.grad.detach().clone()
    finally:
        weight.grad = None
        weight.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)


def test_move_gains_are_the_gradient_against_each_round_trip(job):
    """gain_f = −⟨g, Ŵ_f − Ŵ_cur⟩ with g measured directly, and a finite step along Ŵ_f − Ŵ_cur agrees."""
    model, calibration, _, names = job
    shared = shared_of(model, calibration)
    reference, cache = shared["reference"], shared["cache"]
    formats = mixed(names)
    result = restore_gains(model, reference, cache, names, formats=formats, menu=MENU)
    for name in (names[0], names[1], names[-1]):  # one at blocksize 64, one at 32, the last layer's
        current = formats[name]
        g = gradient(model, reference, cache, names, formats, name).double()
        weight = cache.original(name).double()
        here = cache.restored(name, current).double()
        for label, fmt in MENU.items():
            there = cache.restored(name, fmt).double()
            move = result.moves[name][label]
            assert move.gain == pytest.approx(-float((g * (there - here)).sum()), rel=1e-3, abs=1e-9)
            assert move.error_sq == pytest.approx(float((there - weight).pow(2).sum()), rel=1e-5)
            assert move.overlap == pytest.approx(float(((there - weight) * (here - weight)).sum()), rel=1e-5)
        assert result.moves[name][current.name].gain == 0.0
        assert result.gains[name] == pytest.approx(float((g * (here - weight)).sum()), rel=1e-3)
    name = max(names, key=lambda n: abs(result.moves[n]["nf4-bs32" if formats[n] is NF4 else "nf4"].gain))
    target = "nf4-bs32" if formats[name] is NF4 else "nf4"
    eps = 0.05
    sixteen = KLReference(copy.deepcopy(model), calibration, 4)  # the 16-bit logits from a second copy
    with cache.quantized(names, formats):
        weight = cache.modules[name].weight
        here = weight.data
        base = model_kld(model, sixteen)
        weight.data = here + eps * (cache.restored(name, MENU[target]) - here)
        try:
            moved = model_kld(model, sixteen)
        finally:
            weight.data = here
    assert (base - moved) / eps == pytest.approx(result.moves[name][target].gain, rel=0.15, abs=1e-5)
    assert not any(p.grad is not None for p in model.parameters())


def test_the_context_is_each_modules_own_format(job):
    """The pass measures the mixed plan's KL, not all-blocksize-64's (which differs)."""
    model, calibration, _, names = job
    shared = shared_of(model, calibration)
    formats = mixed(names)
    kld = InMemoryKLs(shared["reference"], shared["cache"])({"mixed": formats, "all64": list(names)}).kld
    measured = restore_gains(model, shared["reference"], shared["cache"], names, formats=formats).kld
    assert measured == pytest.approx(kld["mixed"], rel=1e-4)
    assert abs(kld["mixed"] - kld["all64"]) > 1e-3 * kld["all64"]


def test_move_score_is_exact_for_an_isotropic_quadratic_and_keeps_todays_score():
    """KL = ½ h‖e‖² per module: g = h e_cur, and the score of f is q_f = h‖e_f‖² (twice f's KL cost)."""
    gen = torch.Generator().manual_seed(0)
    e_cur, noise = torch.randn(500, generator=gen, dtype=torch.float64), torch.randn(500, generator=gen,
                                                                                       dtype=torch.float64)
    e_f = 0.5 * e_cur + 0.75 * noise  # as two blocksizes: half shared, a new rounding of about the same size
    h = 3.0
    g = h * e_cur
    restore = float(g @ e_cur)
    here = Move(0.0, float(e_cur @ e_cur), float(e_cur @ e_cur))
    there = Move(-float(g @ (e_f - e_cur)), float(e_f @ e_f), float(e_f @ e_cur))
    assert move_score(restore, here, there) == pytest.approx(h * float(e_f @ e_f), rel=1e-9)
    assert move_score(restore, here, here) == pytest.approx(restore)  # the current format: the restore gain
    first_order = restore - there.gain
    assert first_order < 0.8 * h * float(e_f @ e_f)  # what plain first order would have said: too small
    assert move_score(-1.0, here, here) == 0.0  # clamped like every planner score
    from quantplan.analysis.endtoend import RestoreGains
    result = RestoreGains(0.1, {"a": restore, "b": float("nan")}, moves={"a": {"x": here, "y": there}})
    assert menu_scores(result, {"a": "x"}) == {"x": {"a": pytest.approx(restore)},
                                               "y": {"a": pytest.approx(h * float(e_f @ e_f))}}


def test_refine_over_the_menu_may_use_blocksize_32_within_the_budget(job, capsys):
    model, calibration, table, _ = job
    shared = shared_of(model, calibration)
    used = set()
    for budget in ("+3%", "+20%"):
        refined = refine(table, budget, model, calibration, rounds=2, **shared)
        assert refined.tiers == ["nf4", "nf4-bs32"]
        assert refined.predicted.bytes <= refined.budget.bytes == plan(table, budget).budget.bytes
        assert refined.budget.spec == budget and len(refined.checks.refinement.history) == 2
        used |= set(refined.choices.values())
    assert {"nf4-bs32", KEEP} <= used
    assert "using nf4 only" not in capsys.readouterr().out


def test_each_round_computes_in_the_previous_rounds_plan(job, monkeypatch):
    """Round 1's context is the table's (mixed) plan, round r+1's the plan round r chose: formats included."""
    model, calibration, table, _ = job
    contexts, plans = [], []
    measured, planned = refine_module.restore_gains, PlanConfig.plan

    def recording_gains(*args, formats=None, **kwargs):
        contexts.append({n: f.name for n, f in formats.items()})
        return measured(*args, formats=formats, **kwargs)

    def recording_plan(self, *args, **kwargs):
        plans.append(planned(self, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(refine_module, "restore_gains", recording_gains)
    monkeypatch.setattr(PlanConfig, "plan", recording_plan)
    first = next(p for p in (plan(table, b) for b in ("+1%", "+2%", "+3%", "+5%")) if p.mixed_blocksizes)
    refine(table, first.budget.spec, model, calibration, rounds=3, **shared_of(model, calibration))
    assert len(contexts) == 3 and len(plans) == 4  # the table's plan, then one a round
    assert set(contexts[0].values()) == {"nf4", "nf4-bs32"}
    for context, before in zip(contexts, plans, strict=False):
        assert context == {n: before.choices[n] if before.choices[n] != KEEP else "nf4" for n in context}
    assert all(plans[r].choices[n] != KEEP for r in (1, 2) for n in contexts[r])  # kept in a round: decided


def test_refine_refuses_a_tier_that_is_not_4bit(job):
    model, calibration, _, _ = job
    table = analyze(model, calibration, [NF4, INT8], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="--tiers nf4 with --refine"):
        refine(table, "+20%", model, calibration, config=PlanConfig(tiers=("nf4", "int8")), rounds=1,
               **shared_of(model, calibration))


def test_plan_takes_scores_per_tier(job):
    """The knapsack reads each tier's scores: a free blocksize 32 puts every 4-bit module there; an unknown tier
    is refused."""
    _, _, table, names = job
    free = plan(table, "+20%", scores={"nf4-bs32": dict.fromkeys(names, 0.0)})
    assert free.predicted.error == 0.0 and "nf4" not in free.choices.values()
    assert "nf4-bs32" in free.choices.values()
    with pytest.raises(ValueError, match="does not use"):
        plan(table, "+20%", scores={"int8": {}})
