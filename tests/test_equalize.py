"""Channel equalization (analysis/equalize.py): the 16-bit function kept to the last bit, the 4-bit error lowered,
undone where a norm is not γ ⊙ n, and written into the checkpoint as the analysis measured it."""

from __future__ import annotations

import importlib
import json

import pandas as pd
import pytest
import torch
from tiny import LabelledCalibration, random_calibration, save_tiny_english, tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM

from quantplan.analysis import NF4, equalize, load_calibration, load_model, load_processor, resolve_source
from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.equalize import (
    Equalization,
    apply_equalization,
    measure_equalization,
    scale_tensor,
    shared_inputs,
)
from quantplan.analysis.formats import NF4_BS32

#: the default blocksize menu, the formats whose round trips decide which scales help
MENU = [NF4, NF4_BS32]


@pytest.fixture
def every_scale(monkeypatch):
    """Keep every input's scales, helpful or not: the tests of what the run does with them use random models, whose
    channels the guard rightly leaves alone."""
    monkeypatch.setattr(equalize, "_helpful", lambda modules, measured, formats: [g for g, _ in measured])


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], use_cache=False)


def _linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")}


def _outlier_llama(seed: int = 0):
    """A tiny Llama whose norms make a few input channels 16x larger (as trained models' outlier channels)."""
    model = tiny_llama(layers=2, hidden=128, intermediate=256, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[::16] *= 16
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_scales_keep_the_16bit_logits_bit_identical_and_undo_exactly():
    model = _outlier_llama()
    batch = random_calibration(4, 32, vocab=256).input_ids
    before, weights = _forward(model, {"input_ids": batch}).logits, _state(model)
    equalization = measure_equalization(model, {"input_ids": batch}, _linears(model), _forward, MENU)
    # per layer: input norm -> q/k/v, post-attention norm -> gate/up, up -> down, where the round trips say they help
    assert {g.source.rsplit(".", 1)[-1] for g in equalization.groups} >= {"input_layernorm", "post_attention_layernorm"}
    assert any(e != 0 for g in equalization.groups for e in g.exponents)
    assert torch.equal(_forward(model, {"input_ids": batch}).logits, before)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert "model.layers.0.input_layernorm.weight" in changed and "model.layers.1.mlp.up_proj.weight" in changed
    apply_equalization(model, equalization, inverse=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_scale_tensor_gives_the_checkpoint_the_scaled_model_holds():
    """The export scales the source's tensors one by one: the same values as the model the analysis scaled."""
    model = _outlier_llama()
    source = _state(model)
    equalization = measure_equalization(model, {"input_ids": random_calibration(4, 32).input_ids}, _linears(model),
                                        _forward, MENU)
    for key, value in model.state_dict().items():
        assert torch.equal(scale_tensor(equalization, key, source[key]), value), key
    assert Equalization.from_dict(json.loads(json.dumps(equalization.to_dict()))) == equalization


def test_scales_lower_the_4bit_output_error_of_outlier_inputs():
    model = _outlier_llama()
    calibration = random_calibration(8, 32)
    batch = {"input_ids": calibration.input_ids[:4]}

    def nf4_error() -> float:
        inputs = {}
        def keep(name):
            def hook(_module, args):
                inputs[name] = args[0].detach().float()
            return hook

        handles = [model.get_submodule(n).register_forward_pre_hook(keep(n))
                   for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj")]
        _forward(model, batch)
        for h in handles:
            h.remove()
        total = 0.0
        for name, x in inputs.items():
            weight = model.get_submodule(name).weight.data
            restored, _ = NF4.roundtrip(weight)
            total += float(((x @ (restored.float() - weight.float()).T) ** 2).sum())
        return total

    before = nf4_error()
    measure_equalization(model, batch, _linears(model), _forward, MENU)
    assert nf4_error() < 0.8 * before


def test_a_norm_other_than_gamma_times_n_is_left_as_it_was(every_scale):
    """Gemma's norms compute (1 + γ) ⊙ n, and its post-attention norm reads the attention output: the check sees the
    outputs move and undoes every scale."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    model = Gemma2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[::8] += 4.0
    assert shared_inputs(model, _linears(model))  # the names match Llama's layout
    weights = _state(model)
    equalization = measure_equalization(model, {"input_ids": random_calibration(2, 16).input_ids}, _linears(model),
                                        _forward, MENU)
    assert not equalization and "differed" in equalization.note
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    return save_tiny_english(tmp_path_factory.mktemp("eq") / "model")


def test_run_exports_the_scaled_weights_and_no_equalize_the_source_ones(english, tmp_path, every_scale):
    from quantplan.pipeline import run

    config = dict(samples=8, seq_len=64, progress=False)
    result = run(str(english), "+10%", tmp_path / "eq", AnalyzeConfig(**config))
    plan = json.loads((tmp_path / "eq" / "plan.json").read_text())
    assert plan["equalization"]["groups"] and "equalization" in plan["bnb_config"]
    equalization = Equalization.from_dict(plan["equalization"])
    source = load_model(resolve_source(str(english)))
    exported = load_model(resolve_source(str(result["checkpoint"])))  # plain from_pretrained of a 4-bit checkpoint
    norms = [k for k in source.state_dict() if k.endswith("layernorm.weight")]
    expected = {k: scale_tensor(equalization, k, source.state_dict()[k]) for k in norms}
    assert all(torch.equal(exported.state_dict()[k].to(v.dtype), v) for k, v in expected.items())
    assert any(not torch.equal(v, source.state_dict()[k]) for k, v in expected.items())  # some channel moved
    ids = random_calibration(2, 32).input_ids
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(exported(input_ids=ids).logits.float().log_softmax(-1),
                                        source(input_ids=ids).logits.float().log_softmax(-1), log_target=True,
                                        reduction="batchmean")
    assert float(kl) < 1.0  # a 4-bit copy of the same function, not another model

    plain = run(str(english), "+10%", tmp_path / "plain", AnalyzeConfig(**config, equalize=False))
    assert json.loads((tmp_path / "plain" / "plan.json").read_text())["equalization"] is None
    exported = load_model(resolve_source(str(plain["checkpoint"])))
    assert all(torch.equal(exported.state_dict()[k].to(source.dtype), source.state_dict()[k]) for k in norms)


def test_the_scoreboard_counts_recovery_from_plain_nf4_of_the_source_weights(english, tmp_path, every_scale):
    """Every simulated row runs on the scaled weights, but one: all-4-bit of the source's own weights, which equals
    all-NF4 measured on a fresh, unscaled load, and which the recovery column counts from."""
    from quantplan.analysis.simulate import QuantCache
    from quantplan.pipeline import analyze_model
    from quantplan.planner import plan
    from quantplan.reports.compare import CompareConfig, ReportDepth
    from quantplan.reports.compare import compare as compare_variants
    from quantplan.reports.fidelity import heldout_reference, measure_variants

    source = resolve_source(str(english))
    table = analyze_model(source, tmp_path / "job", AnalyzeConfig(samples=8, seq_len=64, dtype="fp32", progress=False))
    options = CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.QUICK, progress=False)
    comparison = compare_variants(source, [plan(table, "+10%")], table=table, options=options)
    rows = comparison.scoreboard.set_index("variant")
    plain = rows.loc["all-NF4, source weights", "mean_kld"]
    assert rows.loc["all-NF4, equalized", "mean_kld"] != plain
    fresh = load_model(source, dtype=torch.float32)
    heldout = comparison.meta["heldout"]
    ids = load_calibration(load_processor(source), heldout["source"], heldout["samples"], heldout["seq_len"]).input_ids
    names = [n for n, m in fresh.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")]
    expected = measure_variants(heldout_reference(fresh, ids), QuantCache(fresh, NF4), {"v": names})["v"].kld.mean()
    assert plain == pytest.approx(float(expected), rel=1e-5)
    recovery = rows["recovery_pct"]
    assert recovery.loc["all-NF4, source weights"] == pytest.approx(0.0)
    assert recovery.loc["dynamic +10%"] == pytest.approx(100 * (1 - rows.loc["dynamic +10%", "mean_kld"] / plain))


def test_scales_that_do_not_lower_the_error_are_not_applied():
    """A random model's activations have no outlier channels the weights do not share: the guard's round trips find
    the scales make the rounding worse, and the model keeps its weights."""
    model = tiny_llama(layers=2, hidden=128, intermediate=256)
    weights = _state(model)
    equalization = measure_equalization(model, {"input_ids": random_calibration(4, 32).input_ids}, _linears(model),
                                        _forward, MENU)
    assert len(equalization.groups) < 6
    untouched = {n for n in _linears(model)} - set(equalization.scaled_modules)
    assert untouched and all(torch.equal(model.get_submodule(n).weight, weights[n + ".weight"]) for n in untouched)


def test_a_resumed_analysis_continues_on_the_scales_it_saved(tmp_path, monkeypatch):
    """Ctrl-C midway, then --resume on a fresh load: the saved scales are applied again, not measured again (a GPU
    could round one differently), and the table equals an uninterrupted run's."""
    from test_analysis_inputs import Interrupt

    from quantplan.analysis import analyze

    calibration = random_calibration(samples=12, seq_len=32)
    expected = analyze(_outlier_llama(), calibration, MENU, progress=False, batch_size=2, equalize=True)
    assert expected.meta["equalization"]["groups"]
    model = _outlier_llama()
    handle = model.model.layers[0].register_forward_hook(Interrupt(at=4))
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        analyze(model, calibration, MENU, progress=False, batch_size=2, out_dir=tmp_path, equalize=True)
    handle.remove()
    measured = []
    monkeypatch.setattr(importlib.import_module("quantplan.analysis.analyze"), "measure_equalization",
                        lambda *a, **k: measured.append(a))
    resumed = analyze(_outlier_llama(), calibration, MENU, progress=False, batch_size=2, out_dir=tmp_path,
                      resume=True, equalize=True)
    assert not measured and resumed.meta["equalization"] == expected.meta["equalization"]
    columns = ["output_rel_error", "weight_rel_error", "tokens", "input_max_abs"]
    pd.testing.assert_frame_equal(resumed.df[columns], expected.df[columns], rtol=1e-9)


def test_real_bitsandbytes_rows_never_read_unscaled_source_files(english, tmp_path, every_scale, monkeypatch):
    """Where transformers cannot quantize from the model in memory (MoE checkpoints' converted tensors), a real
    bitsandbytes row would load the source files, whose weights are not the plans' scaled ones: it says so instead.
    A streamed scoreboard of a scaled table is refused with the fix."""
    import quantplan.reports.compare as compare_module
    from quantplan.pipeline import analyze_model
    from quantplan.planner import plan
    from quantplan.reports.compare import CompareConfig, ReportDepth

    source = resolve_source(str(english))
    table = analyze_model(source, tmp_path / "job", AnalyzeConfig(samples=8, seq_len=64, dtype="fp32", progress=False))
    monkeypatch.setattr(compare_module, "load_quantized_from", lambda *a, **k: None)
    options = CompareConfig(samples=2, seq_len=32, dtype="fp32", report=ReportDepth.FULL, progress=False, top_k=1,
                            random_k=1, seeds=(0,), max_new_tokens=2)  # full: the real loads (all-INT8's) run
    board = compare_module.compare(source, [plan(table, "+10%")], table=table, options=options).scoreboard
    int8 = board[board["variant"].str.contains("INT8")].iloc[0]
    assert int8["note"].startswith("not measured") and "channel-scaled" in int8["note"]
    with pytest.raises(ValueError, match="--no-equalize"):
        compare_module.compare(source, [plan(table, "+10%")], table=table,
                               options=CompareConfig(samples=2, seq_len=32, dtype="fp32", max_memory="1GB",
                                                     progress=False))


def test_a_resume_into_another_models_partial_state_is_refused_before_any_scale(tmp_path):
    """The saved scales name another model's modules: the state check refuses first, with the fix."""
    from test_analysis_inputs import Interrupt

    from quantplan.analysis import analyze
    from quantplan.analysis.table import TableMismatch

    calibration = random_calibration(samples=12, seq_len=32)
    model = _outlier_llama()
    handle = model.model.layers[0].register_forward_hook(Interrupt(at=4))
    with pytest.raises(KeyboardInterrupt):
        analyze(model, calibration, MENU, progress=False, batch_size=2, out_dir=tmp_path, equalize=True)
    handle.remove()
    other = tiny_llama(layers=1, hidden=128, intermediate=256)
    weights = _state(other)
    with pytest.raises(TableMismatch, match="another"):
        analyze(other, calibration, MENU, progress=False, batch_size=2, out_dir=tmp_path, resume=True, equalize=True)
    assert all(torch.equal(v, weights[k]) for k, v in other.state_dict().items())


def test_fp16_weights_are_not_scaled():
    model = _outlier_llama().to(torch.float16)
    weights = _state(model)
    equalization = measure_equalization(model, {"input_ids": random_calibration(4, 32).input_ids}, _linears(model),
                                        _forward, MENU)
    assert not equalization and "fp16" in equalization.note
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_an_explicit_equalize_under_a_memory_cap_is_refused():
    config = AnalyzeConfig(max_memory="1GB", equalize=True)
    assert not config.equalizes
    with pytest.raises(ValueError, match="--max-memory"):
        config.check_equalize()
    AnalyzeConfig(max_memory="1GB").check_equalize()  # the default: streamed runs simply measure the source weights


def test_a_streamed_analysis_says_it_measures_the_source_weights(english, tmp_path, capsys):
    from quantplan.pipeline import analyze_model

    source = resolve_source(str(english))
    table = analyze_model(source, tmp_path / "job", AnalyzeConfig(samples=4, seq_len=32, dtype="fp32", progress=False,
                                                                  max_memory="1GB", fisher=False))
    assert "not streamed yet" in capsys.readouterr().out and not equalize.equalization_of(table.meta)


def test_batches_with_labels_are_equalized_without_a_loss():
    """The equalization's forwards keep one position's logits: a loss over every label would not match them."""
    from quantplan.analysis import analyze

    table = analyze(_outlier_llama(), LabelledCalibration(random_calibration(8, 32)), MENU, progress=False,
                    batch_size=4, equalize=True)
    assert table.meta["equalization"]["groups"]
