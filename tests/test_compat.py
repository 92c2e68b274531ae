"""Loader compatibility: vLLM-safe plans, the skip list in the checkpoint's names, --vllm-safe's cost, rendering."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.checkpoint_names import checkpoint_prefixes, to_checkpoint_name
from quantplan.planner.compat import format_rows, loader_compat, name_rows, split_fused_sets, vllm_sentence
from quantplan.planner.config import PlanConfig
from quantplan.planner.modelcard import compat_text
from quantplan.reports.report import _compat_blocks, to_markdown

#: Qwen2-VL's renaming as transformers 5.24 saves it (live -> checkpoint)
QWEN2_VL = [["model.language_model.", "model."], ["model.", ""]]


@pytest.fixture(scope="module")
def table():
    return analyze(tiny_llama(layers=4), random_calibration(), [NF4], progress=False)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "mllama"])
def test_checkpoint_names_are_the_saved_tensor_names(arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from vlm_models import save_tiny_vlm

    folder = save_tiny_vlm(arch, tmp_path / arch)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    model = AutoModelForImageTextToText.from_pretrained(folder)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    prefixes = checkpoint_prefixes(model, names)
    assert prefixes, "a VLM's live names differ from its saved names"
    assert all(f"{to_checkpoint_name(n, prefixes)}.weight" in saved for n in names)
    assert any(n.startswith("model.language_model.") for n in names)  # the live names really differ


def test_text_model_names_need_no_renaming(table):
    assert table.meta["checkpoint_prefixes"] == []


def test_partial_skip_in_a_fused_set_is_not_vllm_safe(table):
    split = PlanConfig(keep=("model.layers.1.self_attn.q_proj",),
                       quantize=("model.layers.1.self_attn.k_proj",)).plan(table, "+20%")
    assert ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj") in split_fused_sets(split)
    assert vllm_sentence(split).startswith("vLLM-safe: no") and "q_proj/k_proj/v_proj" in vllm_sentence(split)
    tied = PlanConfig(vllm_safe=True).plan(table, "+40%")
    assert tied.kept != ["lm_head"]
    assert split_fused_sets(tied) == [] and vllm_sentence(tied).startswith("vLLM-safe: yes")


def test_vllm_safe_cost_at_equal_bytes(table):
    config = PlanConfig()
    chosen = config.plan(table, "+15%")
    compat = loader_compat(table, chosen, config)
    free, safe = compat.alternatives
    assert (free.vllm_safe, safe.vllm_safe) == (False, True)
    assert free.bytes <= chosen.budget.bytes and safe.bytes <= chosen.budget.bytes
    assert free.error == pytest.approx(chosen.predicted.error)
    assert safe.error >= free.error - 1e-12  # tying sets can only cost error at the same bytes
    assert compat.vllm_safe == (not split_fused_sets(chosen))


def test_card_and_report_show_both_name_spaces_and_cost(table):
    config = PlanConfig(keep=("model.layers.1.self_attn.q_proj",), quantize=("model.layers.1.self_attn.k_proj",))
    chosen = config.plan(table, "+20%")
    vlm_like = dataclasses.replace(table, meta={**table.meta, "checkpoint_prefixes": QWEN2_VL})
    chosen = dataclasses.replace(chosen, compat=loader_compat(vlm_like, chosen, config))
    rows = name_rows(chosen)
    assert {"transformers 5 (live modules)": "model.layers.1.self_attn.q_proj",
            "checkpoint / vLLM": "layers.1.self_attn.q_proj"} in rows
    card = compat_text(chosen)
    report = to_markdown(_compat_blocks(chosen))
    for text in (card, report):
        assert "vLLM-safe: no" in text and "layers.1.self_attn.q_proj" in text
        assert "| off |" in text and "With `--vllm-safe` on the table cannot be planned" in text
    plain = dataclasses.replace(chosen, compat=loader_compat(table, chosen, config))
    assert name_rows(plain) is None and "same for transformers" in compat_text(plain)


def test_mixed_4bit_formats_are_listed_per_module(table):
    chosen = PlanConfig().plan(table, "+10%")
    assert format_rows(chosen) == []
    first = next(n for n, c in chosen.choices.items() if c == "nf4")
    mixed = dataclasses.replace(chosen, choices={**chosen.choices, first: "fp4"},
                                compat=dataclasses.replace(loader_compat(table, chosen), blocksizes={"nf4": 64,
                                                                                                     "fp4": 128}))
    rows = format_rows(mixed)
    assert {"module": first, "format": "fp4", "blocksize": 128} in rows
    assert {r["blocksize"] for r in rows if r["format"] == "nf4"} == {64}
    assert loader_compat(table, chosen).blocksizes == {"nf4": 64}
    assert "mixes 4-bit formats" in compat_text(mixed) and "Per-module 4-bit formats" in to_markdown(
        _compat_blocks(mixed))


def test_compat_survives_plan_json(table, tmp_path):
    from quantplan.planner.plan_types import Plan

    config = PlanConfig()
    chosen = config.plan(table, "+15%")
    chosen = dataclasses.replace(chosen, compat=loader_compat(table, chosen, config))
    assert Plan.load(chosen.save(tmp_path / "plan.json")) == chosen


def test_vllm_safe_keeps_the_whole_set_of_a_pinned_member(table):
    q, k, v = (f"model.layers.1.self_attn.{m}_proj" for m in "qkv")
    tied = PlanConfig(keep=(q,), vllm_safe=True).plan(table, "+20%")
    assert {tied.choices[n] for n in (q, k, v)} == {"16bit"} and split_fused_sets(tied) == []
    assert "fused with model.layers.1.self_attn.q_proj" in tied.reasons[k].text
    with pytest.raises(ValueError, match="pinned by --quantize.*drop one"):
        PlanConfig(keep=(q,), quantize=(k,), vllm_safe=True).plan(table, "+20%")
