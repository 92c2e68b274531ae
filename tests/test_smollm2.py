"""The real offline model, SmolLM2-135M-Instruct (slow: ~1-2 min in all)."""

from __future__ import annotations

import pytest
import torch
from fixtures import swapped_output_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantplan import AnalyzeConfig, run
from quantplan.analysis import NF4, analyze, load_calibration

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_calibration(smol_tokenizer):
    return load_calibration(smol_tokenizer, None, samples=4, seq_len=128)


@pytest.fixture(scope="module")
def smol_table(smol_model, smol_calibration, smol_source):
    return analyze(smol_model, smol_calibration, [NF4], progress=False, model_fingerprint=smol_source.fingerprint)


def test_smollm2_all_210_linears_measured(smol_table):
    rows = smol_table.for_format("nf4")
    linear = rows[rows["kind"] == "Linear"]
    assert linear["quantizable"].sum() == 210
    assert "tied to the input embeddings" in linear.set_index("name").loc["lm_head", "reason"]
    optional = ["output_fisher_error", "restore_gain", "context_output_rel_error"]  # NaN unless fisher / context
    measured = linear[linear["quantizable"]].drop(columns=optional)
    assert measured.notna().all().all()
    assert (measured["tokens"] == 4 * 128).all()
    assert set(measured["layer"]) == set(range(30))


def test_smollm2_output_error_equals_linear4bit_swap(smol_model, smol_table, smol_calibration):
    """The Gram-matrix output error is the real swap's: to 1e-3 with float32 Gram products; with the bf16 products of
    a bf16 model on bf16 hardware (analysis.gram.product_dtype: one bf16 rounding of each batch's products) to 3e-3
    (measured 1.3e-3 on layer 12's v_proj, one batch of 512 tokens)."""
    from quantplan.analysis.gram import product_dtype

    rows = smol_table.for_format("nf4").set_index("name")
    weight = smol_model.get_submodule("model.layers.0.mlp.down_proj").weight
    tolerance = 1e-3 if product_dtype(weight) == torch.float32 else 3e-3
    for name in ["model.layers.0.mlp.down_proj", "model.layers.12.self_attn.v_proj"]:
        exact = swapped_output_error(smol_model, name, smol_calibration, torch.float32)
        assert rows.loc[name, "output_rel_error"] == pytest.approx(exact, rel=tolerance), name


def test_smollm2_run_reload_generate(smol_source, tmp_path):
    options = AnalyzeConfig(samples=8, seq_len=128, progress=False)
    out = run(None, "+10%", tmp_path / "smol", options)
    plan = out["plan_obj"]
    assert plan.predicted.bytes <= plan.budget.bytes
    model = AutoModelForCausalLM.from_pretrained(out["checkpoint"], device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(out["checkpoint"])
    assert model.get_memory_footprint() == pytest.approx(plan.predicted.footprint_bytes, rel=0.01)
    kept = dict(model.named_modules())
    assert all(type(kept[n]) is torch.nn.Linear for n in plan.kept)
    assert plan.tiers == ["nf4", "nf4-bs32"]  # the default blocksize menu, each module at its own blocksize
    assert all(kept[n].weight.quant_state.blocksize == plan.format_of(c)["blocksize"]
               for n, c in plan.choices.items() if c != "16bit")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print("SmolLM2 dynamic +10%:", answer)
    assert len(answer.strip()) > 0
