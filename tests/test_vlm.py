"""Vision-language models end to end, one tiny random-init model per architecture.

For each: analyze with the shipped photos -> plan (with the rule priors) -> export -> reload
with plain ``from_pretrained`` -> generate with an image. The export's own reload check
(every planned module a plain Linear, every other quantizable one a Linear4bit) is what
proves the skip list names the live modules transformers 5 builds, whose prefixes differ from
the checkpoint keys (``model.visual.*`` live, ``visual.*`` on disk; ``model.language_model.*``
live, ``language_model.model.*`` or ``model.layers.*`` on disk).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_models import TEXT, chat_template, save_tiny_vlm, word_tokenizer

from quantplan.analysis import NF4, analyze, load_model, load_processor, resolve_source
from quantplan.analysis.vision import calibration_for_model, process_pair
from quantplan.planner import export, plan
from quantplan.planner.priors import kept_by, rule_priors
from quantplan.planner.reasons import Reason, ReasonKind
from quantplan.reports import plots

#: per architecture: Linear count per group, one live module name per group, a checkpoint key prefix
ARCHITECTURES = {
    "qwen2_vl": ({"vision_tower": 8, "projector": 2, "language_model": 14, "lm_head": 1},
                 "model.visual.merger.mlp.0", "visual.merger.mlp.0.weight"),
    "qwen2_5_vl": ({"vision_tower": 10, "projector": 2, "language_model": 14, "lm_head": 1},
                   "model.visual.merger.mlp.0", "visual.merger.mlp.0.weight"),
    "qwen3_vl": ({"vision_tower": 8, "projector": 4, "language_model": 14, "lm_head": 1},
                 "model.visual.deepstack_merger_list.0.linear_fc1",
                 "model.visual.deepstack_merger_list.0.linear_fc1.weight"),
    "mllama": ({"vision_tower": 18, "projector": 1, "cross_attention": 4, "language_model": 17, "lm_head": 1},
               "model.multi_modal_projector", "multi_modal_projector.weight"),
    "llava": ({"vision_tower": 12, "projector": 2, "language_model": 14, "lm_head": 1},
              "model.multi_modal_projector.linear_1", "multi_modal_projector.linear_1.weight"),
    "llava_pixtral": ({"vision_tower": 14, "projector": 2, "language_model": 14, "lm_head": 1},
                      "model.multi_modal_projector.linear_1", "multi_modal_projector.linear_1.weight"),
    "idefics3": ({"vision_tower": 12, "projector": 1, "language_model": 14, "lm_head": 1},
                 "model.connector.modality_projection.proj", "model.connector.modality_projection.proj.weight"),
    "smolvlm": ({"vision_tower": 12, "projector": 1, "language_model": 14, "lm_head": 1},
                "model.connector.modality_projection.proj", "model.connector.modality_projection.proj.weight"),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def analyzed(request, tmp_path_factory):
    """(arch, source, processor, table) for one architecture, analyzed on 4 shipped photos."""
    arch = request.param
    if arch == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words (pip install num2words)")
    source = resolve_source(str(save_tiny_vlm(arch, tmp_path_factory.mktemp(arch) / "model")))
    model = load_model(source)
    processor = load_processor(source)
    calibration = calibration_for_model(model.config, processor, images="default", samples=4)
    table = analyze(model, calibration, [NF4], model_id=arch, model_fingerprint=source.fingerprint, progress=False)
    return arch, source, processor, table


def test_groups_and_layers_per_tower(analyzed):
    arch, _, _, table = analyzed
    counts, projector, _ = ARCHITECTURES[arch]
    rows = table.for_format("nf4")
    linear = rows[rows["kind"] == "Linear"]
    assert linear.groupby("group").size().to_dict() == counts
    assert linear.set_index("name").loc[projector, "group"] == "projector"
    vision = linear[linear["group"] == "vision_tower"]
    assert sorted(vision["layer"].unique()) == list(range(3 if arch == "mllama" else 2))
    language = linear[linear["group"] == "language_model"]
    assert sorted(language["layer"].unique()) == list(range(3 if arch == "mllama" else 2))
    # the images reached every tower: each Linear was measured on data, not ranked by weight error
    assert (linear["tokens"] > 0).all(), linear.loc[linear["tokens"] == 0, "name"].tolist()
    assert linear["output_rel_error"].notna().all()


def test_plan_export_reload_generate(analyzed, tmp_path):
    arch, source, processor, table = analyzed
    _, projector, checkpoint_key = ARCHITECTURES[arch]
    priors = rule_priors(table, "all")
    p = plan(table, "+50%", priors=priors)
    assert p.reasons[projector].text.startswith("prior: projector")
    assert projector in kept_by(p)[ReasonKind.PRIOR] and projector in p.skip_modules
    result = export(source, p, tmp_path / "out")  # reloads and checks every module's type itself
    assert result.quantized > 0 and result.kept == len(p.kept)

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert checkpoint_key in keys  # the 16-bit projector, under its checkpoint (not live) name

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", device_map="cpu")
    modules = dict(model.named_modules())
    for name, choice in p.choices.items():
        assert (type(modules[name]).__name__ == "Linear4bit") == (choice != "16bit"), name
    if arch == "qwen3_vl":  # a real Qwen3VLProcessor folder: AutoProcessor needs torchvision for its video half
        reloaded = load_processor(resolve_source(str(tmp_path / "out")))
    else:
        reloaded = AutoProcessor.from_pretrained(tmp_path / "out")
    from PIL import Image

    from quantplan.analysis.vision import SHIPPED_IMAGES

    inputs = process_pair(reloaded, Image.open(SHIPPED_IMAGES / "chelsea.jpg").convert("RGB"),
                          "What animal is in this picture?")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_mllama_cross_attention_prior(tmp_path):
    source = resolve_source(str(save_tiny_vlm("mllama", tmp_path / "m")))
    model = load_model(source)
    calibration = calibration_for_model(model.config, load_processor(source), images="default", samples=2)
    table = analyze(model, calibration, [NF4], model_fingerprint=source.fingerprint, progress=False)
    o_proj = "model.language_model.layers.1.cross_attn.o_proj"
    assert rule_priors(table, "mllama_cross_attn_o_proj") == {
        o_proj: Reason(ReasonKind.PRIOR,
                       "Mllama cross-attention o_proj kept 16-bit (writes the image signal into the text stream)")}
    p = plan(table, "+20%", priors=rule_priors(table, "all"))
    assert p.choices[o_proj] == "16bit" and o_proj in kept_by(p)[ReasonKind.PRIOR]
    # the global vision blocks continue the local blocks' numbering
    rows = table.modules().set_index("name")
    assert rows.loc["model.vision_model.global_transformer.layers.0.mlp.fc1", "layer"] == 2
    # priors switched off: nothing is kept by rule; --quantize overrides a prior
    assert kept_by(plan(table, "+20%", priors=rule_priors(table, "none")))[ReasonKind.PRIOR] == []
    p = plan(table, "+20%", priors=rule_priors(table, "all"), quantize=[o_proj])
    assert p.choices[o_proj] == "nf4" and p.reasons[o_proj].kind is ReasonKind.PINNED_QUANTIZE


def test_text_only_calibration_of_a_vlm(tmp_path):
    source = resolve_source(str(save_tiny_vlm("qwen2_vl", tmp_path / "q")))
    model = load_model(source)
    calibration = calibration_for_model(model.config, load_processor(source), text_only=True, samples=2, seq_len=16)
    assert calibration.input_ids.shape == (2, 16)
    table = analyze(model, calibration, [NF4], progress=False)
    rows = table.modules().set_index("name")
    assert rows.loc["model.visual.blocks.0.attn.qkv", "tokens"] == 0  # ranked by weight error instead
    assert rows.loc["model.language_model.layers.0.mlp.down_proj", "tokens"] == 32
    # the report's plots: the tower's panels say it was not measured (a log scale over NaN only raised)
    for figure in (plots.plot_layer_errors(table), plots.plot_input_outliers(table)):
        notes = [t.get_text() for ax in figure.axes for t in ax.texts if t.get_text().startswith("not measured")]
        assert len(notes) == (1 if len(figure.axes) == 2 else 2)
        assert plots.save_figure(figure, tmp_path, "plot")["png"].stat().st_size > 0


def test_odd_vision_dims_are_kept_16bit_not_a_crash(tmp_path):
    """A tower whose Linears bitsandbytes cannot block (36x36) stays 16-bit with a reason; export verifies."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(["<image>"])
    config = LlavaConfig(text_config=dict(TEXT, model_type="llama"),
                         vision_config=dict(model_type="clip_vision_model", hidden_size=36, intermediate_size=72,
                                            num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path / "odd")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=chat_template("<image>")).save_pretrained(tmp_path / "odd")
    source = resolve_source(str(tmp_path / "odd"))
    model = load_model(source)
    calibration = calibration_for_model(model.config, load_processor(source), images="default", samples=2)
    table = analyze(model, calibration, [NF4], model_fingerprint=source.fingerprint, progress=False)
    rows = table.modules().set_index("name")
    odd = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    assert not rows.loc[odd, "quantizable"] and "64" in rows.loc[odd, "reason"]
    p = plan(table, "+10%")
    assert p.reasons[odd].kind is ReasonKind.NOT_QUANTIZABLE and odd in p.skip_modules
    export(source, p, tmp_path / "out")


@pytest.mark.parametrize("arch, groups", [
    ("mllama", {"vision_tower": (240, 0, 39), "cross_attention": (32, 3, 38), "language_model": (248, 0, 39),
                "projector": (1, -1, -1), "lm_head": (1, -1, -1)}),
    ("qwen2_vl", {"vision_tower": (128, 0, 31), "projector": (2, -1, -1), "language_model": (560, 0, 79),
                  "lm_head": (1, -1, -1)}),
])
def test_real_size_module_trees_on_the_meta_device(arch, groups):
    """transformers' default (real-size) configs, built weightless: groups, counts and layer ranges."""
    import transformers

    from quantplan.analysis.modules import list_modules

    config_class, model_class = {"mllama": ("MllamaConfig", "MllamaForConditionalGeneration"),
                                 "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration")}[arch]
    with torch.device("meta"):
        model = getattr(transformers, model_class)(getattr(transformers, config_class)())
    linear = [i for i in list_modules(model) if i.is_linear]
    found = {g: (sum(i.group == g for i in linear), min(i.layer for i in linear if i.group == g),
                 max(i.layer for i in linear if i.group == g)) for g in {i.group for i in linear}}
    assert found == groups


@pytest.mark.parametrize("arch", ["llava", "mllama"])
def test_fisher_reaches_the_vision_tower(arch, tmp_path):
    """Gradients flow back through pixel values, so vision and projector modules get Fisher scores too."""
    source = resolve_source(str(save_tiny_vlm(arch, tmp_path / "model")))
    model = load_model(source)
    calibration = calibration_for_model(model.config, load_processor(source), images="default", samples=2)
    rows = analyze(model, calibration, [NF4], progress=False, fisher=True).for_format("nf4")
    measured = rows[rows["quantizable"] & (rows["tokens"] > 0)]
    for group in ("vision_tower", "projector", "language_model"):
        part = measured[measured["group"] == group]
        assert len(part) and part["output_fisher_error"].notna().all(), group


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama"])
def test_quantized_context_and_verification_run_with_images(arch, tmp_path):
    """The end-to-end probes take image batches: every tower's modules get a restore gain, and the
    verification measures the plan against all-4-bit on the image calibration data."""
    from quantplan.analysis.reference import KLReference
    from quantplan.analysis.simulate import QuantCache
    from quantplan.planner.verify import verify

    source = resolve_source(str(save_tiny_vlm(arch, tmp_path / "model")))
    model = load_model(source)
    for name, param in model.named_parameters():  # Mllama's cross-attention gates start at 0 (tanh(0) = 0 cuts
        if "cross_attn" in name and name.endswith("_gate"):  # the vision path); trained models have them open
            param.data.fill_(1.0)
    calibration = calibration_for_model(model.config, load_processor(source), images="default", samples=2)
    table = analyze(model, calibration, [NF4], model_fingerprint=source.fingerprint, progress=False, context=True)
    rows = table.for_format("nf4")
    measured = rows[rows["quantizable"] & (rows["group"] != "lm_head")]
    reached = measured["restore_gain"].notna() & (measured["restore_gain"] != 0)
    assert reached.groupby(measured["group"]).all().all(), measured.loc[~reached, "name"].tolist()
    assert measured["context_output_rel_error"].notna().all()
    shared = {"reference": KLReference(model, calibration, 1), "cache": QuantCache(model, NF4), "progress": False}
    checked = verify(table, plan(table, "+50%", objective="restore"), model, calibration, **shared)
    record = checked.checks.verification
    assert record.tokens > 0 and record.calibration_kld["all-NF4"] > 0
