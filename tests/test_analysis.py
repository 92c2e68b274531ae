"""analysis/: the measurement is right (equals a real Linear4bit swap), finds planted faults, lists everything."""

from __future__ import annotations

import re

import pytest
import torch
from fixtures import swapped_output_error
from tiny import random_calibration, tiny_llama

from quantplan.analysis import FP4, INT8, NF4, analyze
from quantplan.analysis.spikes import find_spikes


def test_output_error_equals_real_linear4bit_swap():
    model = tiny_llama()
    calibration = random_calibration()
    table = analyze(model, calibration, [NF4], progress=False)
    rows = table.for_format("nf4").set_index("name")
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]:
        exact = swapped_output_error(model, name, calibration, torch.float32)
        in_bf16 = swapped_output_error(model, name, calibration, torch.bfloat16)
        measured = rows.loc[name, "output_rel_error"]
        # fp32 swap: same arithmetic up to float rounding; bf16 swap adds output rounding noise.
        assert measured == pytest.approx(exact, rel=1e-3), name
        assert measured == pytest.approx(in_bf16, rel=0.05), name


def test_all_formats_measured_with_exact_bytes():
    model = tiny_llama()
    table = analyze(model, random_calibration(), [NF4, FP4, INT8], progress=False)
    assert table.formats == ["nf4", "fp4", "int8"]
    linear = table.df[table.df["quantizable"]]
    assert linear[["weight_rel_error", "output_rel_error", "output_mse", "output_max_abs_error"]].notna().all().all()
    by_format = linear.groupby("format")["weight_rel_error"].mean()
    assert by_format["int8"] < by_format["nf4"] < by_format["fp4"]  # known ordering of the formats' resolution
    nf4 = linear[linear["format"] == "nf4"]
    for _, row in nf4.iterrows():
        # exact bytes come from bitsandbytes' own state; the shape-only estimate differs only by
        # the printed digits of the nested offset in the JSON metadata
        assert abs(row["bytes"] - NF4.storage_bytes((row["out_features"], row["in_features"]))) <= 8
        assert row["footprint_bytes"] == row["params"] // 2


def test_identity_columns_and_non_linear_modules_listed():
    model = tiny_llama(layers=3)
    rows = analyze(model, random_calibration(), [NF4], progress=False).for_format("nf4").set_index("name")
    assert rows.loc["model.layers.2.mlp.down_proj", "layer"] == 2
    assert rows.loc["model.layers.2.mlp.down_proj", "module_type"] == "down_proj"
    assert rows.loc["lm_head", "group"] == "lm_head"
    assert rows.loc["model.embed_tokens", "kind"] == "Embedding"
    assert not rows.loc["model.embed_tokens", "quantizable"]
    assert "not a Linear" in rows.loc["model.embed_tokens", "reason"]
    assert rows.loc["model.layers.0.self_attn.k_proj", "out_features"] == 32  # 2 kv heads x 16


def test_blocksize_misfit_listed_not_dropped():
    model = tiny_llama(hidden=48, intermediate=99)  # 48*99 elements: not divisible by 64
    table = analyze(model, random_calibration(), [NF4, INT8], progress=False)
    rows = table.df.set_index(["name", "format"])
    assert not rows.loc[("model.layers.0.mlp.up_proj", "nf4"), "supported"]
    assert "not divisible by the nf4 blocksize" in rows.loc[("model.layers.0.mlp.up_proj", "nf4"), "unsupported_reason"]
    assert rows.loc[("model.layers.0.mlp.up_proj", "int8"), "supported"]  # int8 has no block constraint


def test_planted_weight_outlier_tops_weight_error():
    model = tiny_llama()
    target = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        # a 20-sigma element in every other 64-element block: the block's absmax scale grows ~8x, so its
        # other values fall between NF4's coarse codes (the way real outliers hurt blockwise 4-bit)
        target.weight.view(-1)[::128] = target.weight.float().std() * 20
    rows = analyze(model, random_calibration(), [NF4], progress=False).for_format("nf4")
    top = rows.sort_values("weight_rel_error", ascending=False).iloc[0]
    assert top["name"] == "model.layers.1.self_attn.o_proj"
    assert rows.set_index("name").loc[top["name"], "weight_absmax_over_std"] == rows["weight_absmax_over_std"].max()


def test_planted_activation_outlier_channel_spikes_its_consumer():
    """An outlier input channel whose weight column is tiny (the LLM.int8 pattern): output unchanged in
    16-bit, but 4-bit rounds that column away, so the consumer's output error spikes."""
    model = tiny_llama(layers=6)
    channel, scale = 11, 200.0
    layer = model.model.layers[3]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[channel] *= scale
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[:, channel] /= scale
    rows = analyze(model, random_calibration(), [NF4], progress=False).for_format("nf4")
    by_name = rows.set_index("name")
    consumer = "model.layers.3.mlp.up_proj"
    assert by_name.loc[consumer, "input_outlier_channels"] >= 1
    assert by_name.loc[consumer, "input_outlier_ratio"] > 50
    ups = rows[rows["module_type"] == "up_proj"]
    assert ups.sort_values("output_rel_error").iloc[-1]["name"] == consumer
    assert consumer in set(find_spikes(rows)["name"])


def test_nonfinite_activations_flagged_and_run_continues():
    model = tiny_llama()

    def poison(module, args, output):
        output = output.clone()
        output[0, 3, :] = float("nan")
        return output

    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(poison)
    table = analyze(model, random_calibration(), [NF4], progress=False)
    handle.remove()
    rows = table.for_format("nf4").set_index("name")
    assert rows.loc["model.layers.1.mlp.gate_proj", "nonfinite_tokens"] > 0
    assert rows.loc["model.layers.0.mlp.gate_proj", "nonfinite_tokens"] == 0
    assert rows.loc["model.layers.1.mlp.gate_proj", "output_rel_error"] == pytest.approx(
        rows.loc["model.layers.1.mlp.gate_proj", "output_rel_error"])  # finite, not NaN
    assert rows[rows["quantizable"]]["output_rel_error"].notna().all()


def test_shared_inputs_share_one_gram():
    model = tiny_llama()
    from quantplan.analysis.modules import list_modules
    from quantplan.analysis.probe import InputProbe

    names = [i.name for i in list_modules(model) if i.is_linear]
    probe = InputProbe(model, names)
    with probe.attached(), torch.no_grad():
        for batch in random_calibration().batches(4):
            probe.start_batch()
            model(**batch, use_cache=False)
    owner = probe.owner
    assert owner["model.layers.0.self_attn.k_proj"] == owner["model.layers.0.self_attn.q_proj"]
    assert owner["model.layers.0.mlp.up_proj"] == owner["model.layers.0.mlp.gate_proj"]
    assert owner["model.layers.0.mlp.gate_proj"] != owner["model.layers.0.self_attn.q_proj"]
    assert owner["model.layers.0.self_attn.o_proj"] == "model.layers.0.self_attn.o_proj"


def test_fisher_error_matches_its_definition():
    """output_fisher_error = Σ_o mean_t(g_{t,o}²) · Σ_t Δy_{t,o}², checked with captured inputs and gradients."""
    from quantplan.analysis.fisher import loss_backward

    model = tiny_llama()
    calibration = random_calibration(samples=4)
    table = analyze(model, calibration, [NF4], progress=False, fisher=True, batch_size=2)
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    inputs, grads = [], []
    h1 = module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().float().reshape(-1, a[0].shape[-1])))
    h2 = module.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].detach().float().reshape(-1, go[0].shape[-1])))
    for index, batch in enumerate(calibration.batches(2)):
        loss_backward(model, batch, "cpu", seed=index)  # the same seeded sampled labels analyze uses
    h1.remove()
    h2.remove()
    x, g = torch.cat(inputs), torch.cat(grads)
    restored, _ = NF4.roundtrip(module.weight.detach())
    dy = x.double() @ (module.weight.detach().double() - restored.double()).T
    expected = float(((g.double() ** 2).mean(dim=0) * (dy**2).sum(dim=0)).sum())
    measured = table.for_format("nf4").set_index("name").loc[name, "output_fisher_error"]
    assert measured == pytest.approx(expected, rel=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # weights unfrozen again afterwards


def test_measurement_in_row_chunks_gives_the_same_rows(monkeypatch):
    """measure_module reads big weights in row chunks (bounded work space): any chunking gives the same row."""
    import math

    from quantplan.analysis import measure

    model = tiny_llama()
    table = analyze(model, random_calibration(), [NF4, INT8], progress=False, fisher=True)
    monkeypatch.setattr(measure, "CHUNK_ELEMENTS", 7)  # a few rows per chunk, uneven last chunk
    chunked = analyze(model, random_calibration(), [NF4, INT8], progress=False, fisher=True)
    columns = ["weight_rel_error", "weight_max_abs_error", "output_rel_error", "output_mse", "output_max_abs_error",
               "output_fisher_error", "weight_absmax_over_std", "weight_kurtosis"]
    for column in columns:
        for a, b in zip(table.df[column], chunked.df[column], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-12), column


@pytest.mark.parametrize("vocab", [5, 256, 300, 1000, 49155])
def test_two_level_draw_finds_the_index_a_whole_row_cumulative_sum_finds(vocab):
    from quantplan.analysis.fisher import _draw, sampling_uniforms

    torch.manual_seed(vocab)
    probs = (torch.randn(400, vocab) * 3).softmax(dim=-1)
    uniforms = sampling_uniforms(400, "cpu", seed=1)
    cdf = probs.cumsum(dim=-1)
    whole = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=vocab - 1)
    drawn = _draw(probs, uniforms)
    assert int((drawn != whole).sum()) <= 1  # a point within rounding of a boundary may fall on either side
    last = torch.zeros(3, vocab)
    last[:, -1] = 1.0  # all the mass on the last entry, in the last (partial) block
    assert _draw(last, torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, vocab - 1, vocab - 1]
    pieces = torch.cat([_draw(probs[i:i + 7], uniforms[i:i + 7]) for i in range(0, 400, 7)])
    assert torch.equal(pieces, drawn)  # each row on its own: the same in chunks


def test_two_level_draw_never_lands_on_a_zero_probability_entry_after_a_block():
    """A draw at the end of a block whose later entries are zero stays on the block's last nonzero entry, although
    the block's sum and its cumulative sum round differently (the whole-row cumulative sum never picks such an entry)."""
    from quantplan.analysis.fisher import DRAW_BLOCK, _draw

    torch.manual_seed(0)
    probs = torch.zeros(20000, DRAW_BLOCK + 44)
    probs[:, :DRAW_BLOCK] = torch.rand(20000, DRAW_BLOCK)
    probs[:, -1] = torch.rand(20000)  # mass again at the very end, after a run of zeros
    first = probs[:, :DRAW_BLOCK].sum(-1)
    uniforms = (first / probs.sum(-1)).clamp(max=1 - 1e-7)  # every draw at the first block's end, within rounding
    drawn = _draw(probs, uniforms)
    assert bool((probs.gather(-1, drawn.unsqueeze(-1)) > 0).all())


def test_sampled_targets_are_the_same_in_chunks_and_follow_the_distribution():
    from quantplan.analysis.fisher import sample_targets, sampling_uniforms

    logits = torch.randn(300, 50)
    uniforms = sampling_uniforms(300, "cpu", seed=3)
    whole = sample_targets(logits, uniforms)
    pieces = torch.cat([sample_targets(logits[i:i + 64], uniforms[i:i + 64]) for i in range(0, 300, 64)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, sample_targets(logits, sampling_uniforms(300, "cpu", seed=4)))
    peaked = torch.full((2000, 5), -30.0)
    peaked[:, 2] = 0.0
    peaked[:1000, 4] = 0.0  # first half: tokens 2 and 4 equally likely; second half: token 2 only
    drawn = sample_targets(peaked, sampling_uniforms(2000, "cpu", seed=0))
    assert set(drawn[1000:].tolist()) == {2}
    assert 400 < int((drawn[:1000] == 4).sum()) < 600 and set(drawn[:1000].tolist()) == {2, 4}


def test_a_nan_weight_entry_gives_nan_errors_not_the_other_chunks_max(monkeypatch):
    """A NaN in a later row chunk makes the max errors NaN: a max over chunks must not skip it (Python's ``max``
    did, reporting the other chunks' finite max)."""
    import math

    from quantplan.analysis import measure

    monkeypatch.setattr(measure, "CHUNK_ELEMENTS", 8)  # two rows of 4 per chunk
    weight = torch.randn(6, 4)
    weight[5, 1] = float("nan")  # in the last chunk
    errors = measure._DeltaErrors.of(weight, torch.zeros_like(weight), None, None)
    assert math.isnan(errors.max_abs) and math.isnan(errors.norm)
    assert math.isnan(measure.weight_moments(weight).absmax)


def test_a_linear_subclass_stays_16bit_counted_once_and_a_model_of_them_is_refused():
    """transformers' bitsandbytes integration replaces plain nn.Linear only (Falcon's FalconLinear stays 16-bit):
    such a row is not quantizable, its bytes count with the rest of the 16-bit model (they were counted nowhere), and
    a model where nothing but the head could be 4-bit is refused before the calibration pass."""
    from quantplan.analysis.modules import NothingToQuantize

    subclass = type("FalconLikeLinear", (torch.nn.Linear,), {})
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj.__class__ = subclass
    table = analyze(model, random_calibration(), [NF4], progress=False)
    rows = table.for_format("nf4").set_index("name")
    row = rows.loc["model.layers.0.mlp.down_proj"]
    assert not row["quantizable"] and "subclass of nn.Linear" in row["reason"] and row["kind"] == "FalconLikeLinear"
    linear = rows[rows["kind"] == "Linear"]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert table.meta["other_bytes"] + int(linear["params"].sum()) * 2 == model_bytes
    remote = type("Linear", (torch.nn.Linear,), {"__module__": "remote_code"})  # named like the plain class
    model.model.layers[1].mlp.up_proj.__class__ = remote
    rows = analyze(model, random_calibration(), [NF4], progress=False).for_format("nf4").set_index("name")
    assert rows.loc["model.layers.1.mlp.up_proj", "kind"] == "remote_code.Linear"
    for module in model.model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = subclass
    with pytest.raises(NothingToQuantize, match="besides its output head .*FalconLikeLinear, a subclass of nn.Linear"):
        analyze(model, random_calibration(), [NF4], progress=False)


def test_fused_moe_experts_are_named_and_warned_about_before_the_pass():
    """transformers 5 holds a Mixtral layer's experts as 3-D parameters no Linear owns: bitsandbytes leaves them
    16-bit, so they hold most of an "all-4-bit" model; the analysis warns first and the table's metadata names them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).to(torch.bfloat16).eval()
    with pytest.warns(UserWarning, match=r"\d+% of this model's parameters are in 4 matrices no Linear holds "
                                         r"\(model.layers.0.mlp.experts.gate_up_proj, .*fused MoE experts"):
        table = analyze(model, random_calibration(), [NF4], progress=False)
    assert table.meta["bare_matrices"]["model.layers.1.mlp.experts.down_proj"] == [4, 64, 128]
    # the plan carries them into plan.json and the model card, which says they stay 16-bit
    from quantplan.planner import plan
    from quantplan.planner.modelcard import _bare_text
    from quantplan.planner.plan_types import Plan

    p = plan(table, "+0%")
    assert Plan.from_dict(p.to_dict()).bare_matrices == table.meta["bare_matrices"]
    assert re.search(r"4 weight matrices belong to no Linear \(196,608 parameters, \d+% of the 16-bit model; e.g. "
                     r"`model.layers.0.mlp.experts.gate_up_proj`.*they are 16-bit here", _bare_text(p))
    from quantplan.analysis.modules import bare_matrices, list_modules

    llama = tiny_llama()
    assert bare_matrices(llama, list_modules(llama)) == {}  # a dense model: every matrix is some module's weight


def test_fisher_weights_are_zero_only_where_no_gradient_hook_fired():
    """0 for a module that ran in a backpropagated batch and never got a gradient (its output reaches no loss);
    unknown (None, ranked by weight error) where gradients came but every row was non-finite, or where the module never
    ran in a backpropagated batch."""
    from types import SimpleNamespace

    from quantplan.analysis.fisher import GradientProbe, fisher_weights

    grads = GradientProbe(None, ["reached", "nonfinite", "unreached", "forward only"])
    grads.sums.update(reached=torch.full((4,), 2.0), nonfinite=torch.zeros(4))
    grads.tokens.update(reached=2, nonfinite=0)
    grads.ran.update({"reached", "nonfinite", "unreached"})  # ran in a backpropagated batch
    ran, idle = SimpleNamespace(tokens=8), SimpleNamespace(tokens=0)
    assert fisher_weights(grads, "reached", 4, ran).tolist() == [1.0] * 4
    assert fisher_weights(grads, "unreached", 4, ran).tolist() == [0.0] * 4
    assert fisher_weights(grads, "forward only", 4, ran) is None  # ran only in batches the pass did not backpropagate
    assert fisher_weights(grads, "nonfinite", 4, ran) is None
    assert fisher_weights(grads, "unreached", 4, idle) is None and fisher_weights(grads, "unreached", 4, None) is None
    assert fisher_weights(None, "reached", 4, ran) is None


def test_an_already_quantized_model_is_refused_naming_the_16bit_source(tmp_path):
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    save_tiny(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match="already quantized .*pass the 16-bit model it was made from"):
        analyze(model, random_calibration(), [NF4], progress=False)
