"""A LLaVA with a trained text half: SmolLM2-135M-Instruct plus a tiny random CLIP tower (slow).

A structural stand-in for a real VLM (no trained one is available offline): the language
model's 210 Linears carry real activation outliers, the vision tower and projector do not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_models import save_smollm2_llava

from quantplan.analysis import NF4, analyze, load_model, load_processor, resolve_source
from quantplan.analysis.vision import SHIPPED_IMAGES, calibration_for_model, process_pair
from quantplan.planner import export, plan
from quantplan.planner.priors import kept_by, rule_priors
from quantplan.planner.reasons import ReasonKind

pytestmark = pytest.mark.slow


def _ask(model, processor, question: str) -> str:
    text = processor.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_llava_analyze_plan_export_generate(smol_source, tmp_path):
    source = resolve_source(str(save_smollm2_llava(tmp_path / "smollm2-llava", smol_source.path)))
    model = load_model(source)
    processor = load_processor(source)
    assert "Paris" in _ask(model, processor, "What is the capital of France?")  # the trained text half

    calibration = calibration_for_model(model.config, processor, images="default", samples=4)
    table = analyze(model, calibration, [NF4], model_fingerprint=source.fingerprint, progress=False)
    linear = table.modules().query("kind == 'Linear'")
    assert linear.groupby("group").size().to_dict() == {"language_model": 210, "vision_tower": 12,
                                                        "projector": 2, "lm_head": 1}
    assert set(linear.query("group == 'language_model'")["layer"]) == set(range(30))
    assert "tied to the input embeddings" in linear.set_index("name").loc["lm_head", "reason"]
    assert (linear.query("quantizable")["tokens"] > 0).all()

    p = plan(table, "+10%", priors=rule_priors(table, "all"))
    kinds = kept_by(p)
    assert sorted(kinds[ReasonKind.PRIOR]) == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    assert kinds[ReasonKind.MEASURED] and all(n.startswith("model.language_model.")
                                              or n.startswith("model.vision_tower.")
                                              for n in kinds[ReasonKind.MEASURED])
    export(source, p, tmp_path / "out")

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", device_map="cpu")
    modules = dict(reloaded.named_modules())
    assert all(type(modules[n]) is torch.nn.Linear for n in p.kept if n != "lm_head")
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "out")
    from PIL import Image

    inputs = process_pair(reloaded_processor, Image.open(SHIPPED_IMAGES / "astronaut.jpg").convert("RGB"),
                          "Describe this image.")
    out = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    answer = _ask(reloaded, reloaded_processor, "What is the capital of France?")
    print("SmolLM2-LLaVA dynamic +10%:", answer, "| kept by rule:", len(kinds[ReasonKind.PRIOR]),
          "by measurement:", len(kinds[ReasonKind.MEASURED]))
    assert answer.strip()
