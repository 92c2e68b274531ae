"""QLoRA on the export: the model card's own PEFT snippet runs one training step on CPU.

The snippet is read from the exported README.md and run as written (only the folder path filled
in), stopped before ``loss.backward()`` to snapshot the LoRA weights, then finished.
"""

from __future__ import annotations

import math
import re

import bitsandbytes as bnb
import pytest
import torch
from tiny import random_calibration, save_tiny
from vlm_models import save_tiny_vlm

from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source
from quantplan.analysis.vision import calibration_for_model
from quantplan.planner import export, plan
from quantplan.planner.modelcard import LORA_TARGETS

pytest.importorskip("peft")


def run_card_snippet(folder) -> dict:
    """Run the card's QLoRA code on ``folder``; the namespace, plus the LoRA weights before the step."""
    card = (folder / "README.md").read_text()
    code = re.search(r"## Fine-tune \(QLoRA\).*?```python\n(.*?)```", card, re.S).group(1)
    code = code.replace("path/to/this/folder", str(folder))
    before, step = code.split("loss.backward()")
    namespace: dict = {}
    exec(before, namespace)
    namespace["lora_before"] = {n: p.detach().clone() for n, p in namespace["model"].named_parameters()
                                if "lora_" in n}
    exec("loss.backward()" + step, namespace)
    return namespace


def check_qlora(folder, chosen) -> None:
    """16-bit-kept projections stay nn.Linear under LoRA, 4-bit ones are Linear4bit; the step trains LoRA."""
    ran = run_card_snippet(folder)
    model, loss = ran["model"], ran["loss"]
    assert math.isfinite(loss.item())
    modules = dict(model.named_modules())
    targeted = {name: modules["base_model.model." + name] for name in chosen.choices
                if name.rsplit(".", 1)[-1] in LORA_TARGETS}
    kept = [n for n in targeted if chosen.choices[n] == "16bit"]
    quantized = [n for n in targeted if chosen.choices[n] != "16bit"]
    assert kept and quantized
    for name in kept:
        assert type(targeted[name].base_layer) is torch.nn.Linear, name
    for name in quantized:
        assert isinstance(targeted[name].base_layer, bnb.nn.Linear4bit), name
    for name, module in targeted.items():
        assert "default" in module.lora_A, name
        assert not module.base_layer.weight.requires_grad, name
    after = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert after.keys() == ran["lora_before"].keys() and len(after) == 2 * len(targeted)  # A and B per module
    unchanged = [n for n in after if torch.equal(after[n], ran["lora_before"][n])]
    assert not unchanged, unchanged[:4]


def test_qlora_on_a_tiny_llama(tmp_path):
    source = resolve_source(str(save_tiny(tmp_path / "tiny")))
    table = analyze(load_model(source), random_calibration(), [NF4], progress=False,
                    model_fingerprint=source.fingerprint)
    chosen = plan(table, "+15%", keep=["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    export(source, chosen, tmp_path / "out")
    check_qlora(tmp_path / "out", chosen)


def test_qlora_on_a_tiny_vlm(tmp_path):
    source = resolve_source(str(save_tiny_vlm("qwen2_vl", tmp_path / "vlm")))
    model = load_model(source)
    calibration = calibration_for_model(model.config, load_processor(source), images="default", samples=2)
    table = analyze(model, calibration, [NF4], progress=False, model_fingerprint=source.fingerprint)
    chosen = plan(table, "+10%", keep=["model.language_model.layers.1.mlp.down_proj"])
    export(source, chosen, tmp_path / "out")
    assert "AutoModelForImageTextToText.from_pretrained(path" in (tmp_path / "out" / "README.md").read_text()
    check_qlora(tmp_path / "out", chosen)


@pytest.mark.slow
def test_qlora_on_smollm2(smol_source, smol_model, smol_tokenizer, tmp_path):
    calibration = load_calibration(smol_tokenizer, None, samples=4, seq_len=128)
    table = analyze(smol_model, calibration, [NF4], progress=False, model_fingerprint=smol_source.fingerprint)
    chosen = plan(table, "+10%")
    export(smol_source, chosen, tmp_path / "out")
    check_qlora(tmp_path / "out", chosen)
