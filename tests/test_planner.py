"""planner/: budgets, the exact solver, pins, fused groups and every bad budget."""

from __future__ import annotations

import itertools
import random

import pytest
from tiny import random_calibration, tiny_llama

from quantplan.analysis import INT8, NF4, analyze
from quantplan.planner import BudgetError, parse_budget, plan
from quantplan.planner.pareto import pareto_curve
from quantplan.planner.pins import PatternError
from quantplan.planner.solver import Infeasible, Option, greedy, solve


@pytest.fixture(scope="module")
def table():
    return analyze(tiny_llama(layers=4), random_calibration(), [NF4, INT8], progress=False)


@pytest.mark.parametrize("spec,kind,value", [
    ("1.8GB", "absolute", 1.8e9), ("1700MiB", "absolute", 1700 * 2**20), ("512kb", "absolute", 512e3),
    ("123456", "absolute", 123456), ("+10%", "over_4bit", 10), ("+ 33 %", "over_4bit", 33),
    ("0.45x", "of_16bit", 0.45),
])
def test_budget_forms(spec, kind, value):
    budget = parse_budget(spec)
    assert (budget.kind, budget.value) == (kind, pytest.approx(value))


def test_budget_resolution():
    assert parse_budget("+10%").resolve(1000, 4000) == 1100
    assert parse_budget("0.5x").resolve(1000, 4000) == 2000
    assert parse_budget("2kB").resolve(1000, 4000) == 2000


@pytest.mark.parametrize("bad", ["ten percent", "10%", "-5%", "1.8 GBs", "x0.4", ""])
def test_unparseable_budget_names_the_forms(bad):
    with pytest.raises(BudgetError, match=r"1\.8GB.*\+10%.*0\.45x"):
        parse_budget(bad)


def test_greedy_by_ratio_is_suboptimal_where_exact_is_not():
    # A saves most error per byte but blocks B and C, which together save more.
    items = [
        [Option("nf4", 0, 7.0), Option("16bit", 6, 0.0)],
        [Option("nf4", 0, 5.0), Option("16bit", 5, 0.0)],
        [Option("nf4", 0, 5.0), Option("16bit", 5, 0.0)],
    ]
    g, s = greedy(items, 10), solve(items, 10)
    assert g.picks == (1, 0, 0) and g.error == 10.0
    assert s.picks == (0, 1, 1) and s.error == 7.0 and s.cost == 10


def test_solver_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        items = [[Option(str(k), rng.randint(1, 30), rng.random()) for k in range(rng.randint(1, 4))]
                 for _ in range(rng.randint(1, 6))]
        low = sum(min(o.cost for o in it) for it in items)
        high = sum(max(o.cost for o in it) for it in items)
        capacity = rng.randint(low, high)
        best = min(sum(it[j].error for it, j in zip(items, combo, strict=True))
                   for combo in itertools.product(*[range(len(it)) for it in items])
                   if sum(it[j].cost for it, j in zip(items, combo, strict=True)) <= capacity)
        solution = solve(items, capacity)
        assert solution.cost <= capacity
        assert solution.error == pytest.approx(best, abs=1e-12)


def test_solver_infeasible():
    with pytest.raises(Infeasible):
        solve([[Option("a", 5, 1.0)]], 4)


def test_plan_spends_budget_and_beats_all_4bit(table):
    p = plan(table, "+20%")
    pr = p.predicted
    assert pr.bytes <= p.budget.bytes == int(pr.bytes_all_4bit * 1.2)
    assert 0 < pr.error < pr.error_all_4bit
    assert "lm_head" in p.skip_modules and p.choices["lm_head"] == "16bit"
    assert set(p.skip_modules) == set(p.kept)
    assert all(r.text.startswith(("measured", "lm_head", "not quantizable", "pinned")) for r in p.reasons.values())
    bigger = plan(table, "+40%")
    assert bigger.predicted.error <= pr.error


def test_budget_below_minimum_states_the_minimum(table):
    floor = plan(table, "+0%").predicted.bytes_all_4bit
    with pytest.raises(BudgetError, match=rf"minimum of .*\({floor} bytes.*raise the budget to at least that$"):
        plan(table, floor - 1)
    # where rule priors hold part of the minimum, the error says how much and how to plan without them
    down = "model.layers.0.mlp.down_proj"
    with pytest.raises(BudgetError, match=rf"or plan without the rule priors \(--priors none\): they keep 1 "
                                          rf"module\(s\) 16-bit, .* \({down}\)"):
        plan(table, floor, priors={down: "a test rule"})


def test_budget_above_16bit_warns_and_keeps_everything(table):
    with pytest.warns(UserWarning, match="every module stays 16-bit"):
        p = plan(table, "2.0x")
    assert all(c == "16bit" for c in p.choices.values())


def test_keep_and_quantize_pins(table):
    p = plan(table, "+30%", keep=["model.layers.[123].mlp.down_proj"], quantize=["model.layers.0"])
    assert all(p.choices[f"model.layers.{i}.mlp.down_proj"] == "16bit" for i in range(1, 4))
    assert p.reasons["model.layers.1.mlp.down_proj"].text == "pinned: --keep model.layers.[123].mlp.down_proj"
    assert all(c == "nf4" for n, c in p.choices.items() if n.startswith("model.layers.0."))


def test_keep_pattern_that_matches_nothing_lists_nearest(table):
    with pytest.raises(PatternError, match=r"--keep 'model.layers.1.mlp.down_prj' matches no module; nearest names: "
                                           r"\['model.layers.1.mlp.down_proj'"):
        plan(table, "+10%", keep=["model.layers.1.mlp.down_prj"])


def test_keep_and_quantize_overlap_refused(table):
    with pytest.raises(ValueError, match="both --keep and --quantize"):
        plan(table, "+10%", keep=["lm_head"], quantize=["lm_head"])


def test_vllm_safe_keeps_fused_sets_together(table):
    p = plan(table, "+30%", vllm_safe=True)
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        assert len({p.choices[prefix + f"self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj")}) == 1
        assert len({p.choices[prefix + f"mlp.{m}"] for m in ("gate_proj", "up_proj")}) == 1
    free = plan(table, "+30%")
    assert free.predicted.error <= p.predicted.error  # constraints never help the objective


def test_fused_sets_per_parent_include_deepseeks_latent_attention():
    from quantplan.planner.groups import fused_groups

    names = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
             for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    groups = sorted(sorted(g) for g in fused_groups(names))
    assert ["model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.0.self_attn.q_a_proj"] in groups
    assert len(groups) == 8  # per layer: vLLM's fused_qkv_a_proj plus three singletons


def test_whole_blocks_share_one_format(table):
    p = plan(table, "+40%", whole_blocks=True)
    for layer in range(4):
        assert len({c for n, c in p.choices.items() if n.startswith(f"model.layers.{layer}.")}) == 1
    assert any(c == "16bit" for n, c in p.choices.items() if n.startswith("model.layers."))


def test_int8_tier_planned_and_reported(table):
    p = plan(table, "+30%", tiers=["nf4", "int8"])
    assert "int8" in set(p.choices.values())
    only_16 = plan(table, "+30%")
    assert p.predicted.error <= only_16.predicted.error


def test_objectives_differ_and_unknown_refused(table):
    assert plan(table, "+15%", objective="weight").predicted.error > 0
    assert plan(table, "+15%", objective="combined").kept
    with pytest.raises(ValueError, match="unknown objective"):
        plan(table, "+10%", objective="vibes")


def test_pareto_curve_monotone(table):
    curve = pareto_curve(table, points=7)
    assert len(curve) == 7
    assert curve["error"].is_monotonic_decreasing
    assert (curve["bytes"] <= curve["budget_bytes"]).all()
    assert curve["error"].iloc[-1] == 0.0
