"""Device budgets (--kv-context): KV cache bytes per architecture, plans that fit weights + KV + activations, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.attention import attention_config
from quantplan.cli import main
from quantplan.pipeline import plan_summary
from quantplan.planner import BudgetError
from quantplan.planner.config import PlanConfig
from quantplan.planner.kv_cache import CacheKind, activation_bytes, cache_layers, kv_cache_bytes
from quantplan.planner.modelcard import _device_text
from quantplan.planner.plan_types import Plan


@pytest.fixture(scope="module")
def table():
    return analyze(tiny_llama(layers=4), random_calibration(), [NF4], progress=False)


def _config(cls, **kwargs):
    import transformers

    return getattr(transformers, cls)(**kwargs)


def test_llama_gqa_cache_counts_kv_heads_not_query_heads():
    config = _config("LlamaConfig", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
    attention = attention_config(config)
    # Llama 3 8B: 32 layers x 2 (K, V) x 8 KV heads x 128 x 8192 tokens x 2 bytes = 1 GiB
    assert kv_cache_bytes(attention, 8192, 1) == 32 * 2 * 8 * 128 * 8192 * 2 == 2**30
    assert kv_cache_bytes(attention, 8192, 4) == 4 * 2**30
    assert activation_bytes(attention, 8192, 1) == 8192 * (4 * 4096 + 3 * 14336) * 2 + 128256 * 4


def test_sliding_window_layers_cache_only_their_window():
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    gemma = attention_config(_config("Gemma3TextConfig", num_hidden_layers=6, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                     sliding_window=512, layer_types=layer_types))
    assert [layer.kind for layer in cache_layers(gemma)] == [CacheKind.WINDOW] * 5 + [CacheKind.FULL]
    per_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads, head size 16, 2 bytes
    assert kv_cache_bytes(gemma, 8192) == per_token * (5 * 512 + 8192)
    assert kv_cache_bytes(gemma, 100) == per_token * 6 * 100  # shorter than the window: the context
    mistral = attention_config(_config("MistralConfig", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                       sliding_window=1024))
    assert kv_cache_bytes(mistral, 8192) == 2 * 2 * 2 * 16 * 1024 * 2  # every layer slides (no layer_types)


def test_mllama_cross_attention_layers_cache_vision_tokens():
    config = _config("MllamaConfig", text_config=dict(num_hidden_layers=4, cross_attention_layers=[1, 3],
                                                      hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=128, vocab_size=256),
                     vision_config=dict(image_size=56, patch_size=14, max_num_tiles=4))
    attention = attention_config(config)
    vision_tokens = 4 * ((56 // 14) ** 2 + 1)  # tiles x (patches + class token)
    assert attention["cross_attention_tokens"] == vision_tokens
    assert [layer.kind for layer in cache_layers(attention)] == [CacheKind.FULL, CacheKind.CROSS] * 2
    per_token = 2 * 2 * 16 * 2
    assert kv_cache_bytes(attention, 1000) == per_token * (2 * 1000 + 2 * vision_tokens)


def test_unknown_layer_type_is_one_clear_error():
    attention = {"num_hidden_layers": 1, "num_attention_heads": 4, "hidden_size": 64, "layer_types": ["mamba"]}
    with pytest.raises(ValueError, match="'mamba'.*--budget alone"):
        kv_cache_bytes(attention, 10)


def test_device_plan_fits_weights_kv_and_activations(table):
    attention = table.meta["attention"]
    kv, act = kv_cache_bytes(attention, 256, 2), activation_bytes(attention, 256, 2)
    weights_only = PlanConfig().plan(table, "+20%")
    budget = weights_only.budget.bytes + kv + act
    planned = PlanConfig(kv_context=256, kv_batch=2).plan(table, budget)
    d = planned.device
    assert (d.kv_cache_bytes, d.activation_bytes, d.bytes, d.context, d.batch) == (kv, act, budget, 256, 2)
    assert planned.predicted.bytes + kv + act <= budget
    assert planned.choices == weights_only.choices  # the same weights' budget, the same plan
    assert "KV cache" in plan_summary(planned) and "activations" in plan_summary(planned)
    assert Plan.from_dict(json.loads(json.dumps(planned.to_dict()))) == planned
    card = _device_text(planned)
    assert "KV cache (16-bit, 2 x 256 tokens)" in card and "activations" in card and "| total |" in card


def test_device_budget_errors_name_the_numbers(table):
    with pytest.raises(BudgetError, match="leaves nothing for the weights.*KV cache.*activations"):
        PlanConfig(kv_context=4096).plan(table, "100kB")
    attention = table.meta["attention"]
    overhead = kv_cache_bytes(attention, 64) + activation_bytes(attention, 64)
    with pytest.raises(BudgetError, match="minus the KV cache.*leaves .* for the weights: .*below"):
        PlanConfig(kv_context=64).plan(table, overhead + 1000)
    with pytest.raises(BudgetError, match="absolute|as a size"):
        PlanConfig(kv_context=64).plan(table, "+10%")
    with pytest.raises(ValueError, match="--kv-context 0"):
        PlanConfig(kv_context=0)


def test_older_table_reads_the_config_of_its_model_folder(tiny_source):
    from quantplan.analysis import load_model
    from quantplan.analysis.table import SensitivityTable

    model = load_model(tiny_source)
    table = analyze(model, random_calibration(), [NF4], model_id=str(tiny_source.path), progress=False)
    old = SensitivityTable(table.df, {k: v for k, v in table.meta.items() if k != "attention"})
    attention = attention_config(model.config)
    budget = PlanConfig().plan(table, "+20%").budget.bytes + kv_cache_bytes(attention, 128) + \
        activation_bytes(attention, 128)
    assert PlanConfig(kv_context=128).plan(old, budget).device == PlanConfig(kv_context=128).plan(table, budget).device
    lost = SensitivityTable(table.df, {**old.meta, "model_id": "/nowhere/at/all"})
    with pytest.raises(ValueError, match="re-run analyze"):
        PlanConfig(kv_context=128).plan(lost, budget)


def test_plan_cli_with_device_budget(table, tmp_path, capsys):
    table.save(tmp_path)
    attention = table.meta["attention"]
    overhead = kv_cache_bytes(attention, 512) + activation_bytes(attention, 512)
    budget = PlanConfig().plan(table, "+15%").budget.bytes + overhead
    assert main(["plan", "--table", str(tmp_path), "--budget", str(budget), "--kv-context", "512",
                 "--kv-batch", "1"]) == 0
    printed = capsys.readouterr().out
    assert "KV cache" in printed and "vLLM-safe: " in printed
    saved = Plan.load(tmp_path / "plan.json")
    assert saved.device.context == 512 and saved.predicted.bytes + overhead <= budget
    assert main(["plan", "--table", str(tmp_path), "--budget", "+10%", "--kv-context", "512"]) == 2
    assert main(["plan", "--table", str(tmp_path), "--kv-batch", "2"]) == 2
    assert "--kv-batch" in capsys.readouterr().err


def test_version_2_plan_still_reads(table):
    planned = PlanConfig().plan(table, "+10%")
    data = planned.to_dict()
    data["version"] = 2
    del data["device"], data["compat"]
    assert Plan.from_dict(data) == dataclasses.replace(planned, device=None, compat=None)


def test_run_refuses_a_device_budget_too_small_before_loading(tiny_source):
    from transformers import AutoConfig

    from quantplan.analysis.config import AnalyzeConfig
    from quantplan.pipeline import check_budget_fits

    attention = attention_config(AutoConfig.from_pretrained(tiny_source.path))
    overhead = kv_cache_bytes(attention, 1024) + activation_bytes(attention, 1024)
    with pytest.raises(BudgetError, match="less the KV cache and activations .* below this model's all-4-bit"):
        check_budget_fits(tiny_source, overhead + 1000, AnalyzeConfig(), PlanConfig(kv_context=1024))
    check_budget_fits(tiny_source, overhead + 10**7, AnalyzeConfig(), PlanConfig(kv_context=1024))
