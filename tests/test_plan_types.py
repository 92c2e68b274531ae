"""planner/plan_types, reasons, memory_model: typed reasons, frozen plans, plan.json v2 (and v1), one byte model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.planner import plan
from quantplan.planner import reasons as reasons_module
from quantplan.planner.baselines import all_4bit, baseline_keep_sets, plan_keep_set
from quantplan.planner.memory_model import ByteModel
from quantplan.planner.plan import replan_keeping
from quantplan.planner.plan_types import PLAN_VERSION, Checks, Plan, Verification
from quantplan.planner.priors import kept_by, kept_summary
from quantplan.planner.reasons import Reason, ReasonKind

REFINED_TEXT = "refined: kept in round 1/2 (measured KL gain 0.0123 nats/token in the quantized context)"


@pytest.fixture(scope="module")
def table():
    return analyze(tiny_llama(layers=4), random_calibration(), [NF4], progress=False)


@pytest.fixture(scope="module")
def pinned(table):
    """A plan with every kind the planner writes by itself: measured, pins, lm_head."""
    return plan(table, "+30%", keep=["model.layers.1.mlp.down_proj"], quantize=["model.layers.0.mlp.down_proj"])


def v1_plan_json(p: Plan, reasons: dict[str, str]) -> dict:
    """A plan.json as quantplan wrote it before version 2: free-text reasons, plain dicts."""
    return {
        "version": 1, "choices": dict(p.choices), "reasons": reasons, "skip_modules": list(p.skip_modules),
        "budget": {"spec": p.budget.spec, "bytes": p.budget.bytes}, "objective": p.objective, "tiers": list(p.tiers),
        "predicted": {"bytes": p.predicted.bytes, "footprint_bytes": p.predicted.footprint_bytes,
                      "error": p.predicted.error, "bytes_all_4bit": p.predicted.bytes_all_4bit,
                      "error_all_4bit": p.predicted.error_all_4bit, "bytes_16bit": p.predicted.bytes_16bit,
                      "over_all_4bit": p.predicted.over_all_4bit},
        "table_hash": p.table_hash, "model_id": p.model_id, "model_fingerprint": p.model_fingerprint,
        "quant": dict(p.quant), "vllm_safe": p.vllm_safe,
        "checks": {"verification": {"calibration_kld": {"all-NF4": 0.25, "plan": 0.125}, "tokens": 128,
                                    "all_4bit": "all-NF4", "chosen": "plan"}},
        "bnb_config": p.bnb_config_code(),
    }


def v1_reasons(p: Plan) -> dict[str, str]:
    """The plan's reasons as version 1 wrote them, spelled out by hand for the kinds it pins."""
    text = {}
    for name in p.reasons:
        if name == "lm_head":
            text[name] = "lm_head: kept 16-bit as transformers does by default"
        elif name == "model.layers.1.mlp.down_proj":
            text[name] = "pinned: --keep model.layers.1.mlp.down_proj"
        elif name == "model.layers.0.mlp.down_proj":
            text[name] = "pinned: --quantize model.layers.0.mlp.down_proj"
        else:
            text[name] = "measured: kept 16-bit" if p.choices[name] == "16bit" else "measured: nf4"
    return text


def test_reason_renders_its_text_and_round_trips():
    reason = Reason(ReasonKind.PINNED_KEEP, "model.layers.1.*")
    assert reason.text == str(reason) == "pinned: --keep model.layers.1.*"
    assert Reason.from_dict(reason.to_dict()) == reason
    assert Reason.from_text(REFINED_TEXT) == Reason(ReasonKind.REFINED, REFINED_TEXT.removeprefix("refined: "))
    with pytest.raises(ValueError, match="plan again"):
        Reason.from_text("because I said so")


def test_plans_are_frozen_and_save_the_current_version(pinned, tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        pinned.budget = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        pinned.predicted.bytes = 0
    saved = json.loads(pinned.save(tmp_path / "plan.json").read_text())
    assert saved["version"] == PLAN_VERSION == 3 and saved["checks"] == {}
    assert saved["reasons"]["lm_head"] == {"kind": "lm_head", "detail": "kept 16-bit as transformers does by default",
                                           "text": "lm_head: kept 16-bit as transformers does by default"}
    assert saved["budget"] == {"spec": "+30%", "bytes": pinned.budget.bytes}
    assert Plan.load(tmp_path) == pinned
    checked = dataclasses.replace(pinned, checks=Checks(verification=Verification({"plan": 0.1}, 64, "all-NF4", "plan")))
    assert Plan.load(checked.save(tmp_path / "checked.json")) == checked


def test_version_1_plan_json_loads_and_plans_the_same(table, pinned, tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(v1_plan_json(pinned, v1_reasons(pinned)), indent=1))
    loaded = Plan.load(tmp_path)
    assert dataclasses.replace(loaded, checks=Checks()) == pinned
    assert loaded.checks.verification == Verification({"all-NF4": 0.25, "plan": 0.125}, 128, "all-NF4", "plan")
    assert loaded.reasons["model.layers.0.mlp.down_proj"].kind is ReasonKind.PINNED_QUANTIZE
    assert loaded.bnb_config_code() == pinned.bnb_config_code()
    assert plan_keep_set(table, loaded) == plan_keep_set(table, pinned)
    assert baseline_keep_sets(table, loaded, seeds=(0,)) == baseline_keep_sets(table, pinned, seeds=(0,))
    fallback = Reason(ReasonKind.FALLBACK, "all-NF4")
    assert replan_keeping(table, loaded, ["lm_head"], fallback) == replan_keeping(table, pinned, ["lm_head"], fallback)
    # a version-1 plan written after a refinement reads its refined modules as such
    reasons = {**v1_reasons(pinned), "model.layers.2.mlp.up_proj": REFINED_TEXT}
    (tmp_path / "plan.json").write_text(json.dumps(v1_plan_json(pinned, reasons)))
    assert Plan.load(tmp_path).reasons["model.layers.2.mlp.up_proj"].kind is ReasonKind.REFINED


def test_unreadable_plan_json_names_the_fix(pinned, tmp_path):
    data = v1_plan_json(pinned, {**v1_reasons(pinned), "lm_head": "kept for luck"})
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown reason 'kept for luck'.*plan again"):
        Plan.load(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(ValueError, match="format version 7"):
        Plan.load(tmp_path)


def test_refined_modules_are_listed_under_refinement(table):
    """Bug: `run --refine 4` listed refined modules as 'kept 16-bit by lm_head' (reasons grouped by text prefix)."""
    refined = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    decided = {n: Reason(ReasonKind.REFINED, f"kept in round 1/1 (measured KL gain {0.01 * i:.3g} nats/token)")
               for i, n in enumerate(refined)}
    p = plan(table, "+30%", decided=decided)
    kinds = kept_by(p)
    assert kinds[ReasonKind.REFINED] == refined and kinds[ReasonKind.LM_HEAD] == ["lm_head"]
    summary = kept_summary(p)
    assert "kept 16-bit by refinement: 2 — model.layers.0.self_attn.q_proj, model.layers.2.mlp.down_proj" in summary
    assert "kept 16-bit by lm_head: 1 — lm_head" in summary


def test_rewording_reasons_changes_no_decision(table, pinned, monkeypatch):
    before = (baseline_keep_sets(table, pinned, seeds=(0,)), kept_by(pinned))
    reworded = {kind: f"[{kind.name}] " for kind in ReasonKind}
    monkeypatch.setattr(reasons_module, "PREFIXES", reworded)
    again = plan(table, "+30%", keep=["model.layers.1.mlp.down_proj"], quantize=["model.layers.0.mlp.down_proj"])
    assert again.reasons["lm_head"].text.startswith("[LM_HEAD] ")
    assert (baseline_keep_sets(table, again, seeds=(0,)), kept_by(again)) == before


def test_one_byte_model_for_plan_and_baselines(table, pinned):
    model = ByteModel(table, ["nf4"])
    size = model.size(pinned.choices)
    assert (size.bytes, size.footprint_bytes) == (pinned.predicted.bytes, pinned.predicted.footprint_bytes)
    assert model.all_4bit_size("nf4").bytes == pinned.predicted.bytes_all_4bit == all_4bit(table, "nf4").bytes
    assert model.sixteen_bit_size().bytes == pinned.predicted.bytes_16bit
    with pytest.raises(ValueError, match="--tiers nf4,int8"):
        model.size({"lm_head": "int8"})
