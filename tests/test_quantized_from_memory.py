"""The scoreboard's real bitsandbytes variants load from the 16-bit model in memory, not from its files again."""

from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig

from quantplan.analysis import load_model
from quantplan.analysis.models import load_quantized_from

CONFIGS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_variant_as_from_the_files_sharing_plain_parameters(tiny_source, name):
    model16 = load_model(tiny_source)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        before = model16(ids).logits
    from_files = load_model(tiny_source, quantization_config=CONFIGS[name])
    from_memory = load_quantized_from(model16, CONFIGS[name], torch.bfloat16)
    files, memory = from_files.state_dict(), from_memory.state_dict()
    assert files.keys() == memory.keys()
    assert all(torch.equal(files[k], memory[k]) for k in files), "a tensor differs from the files' load"
    assert type(from_memory.model.layers[0].mlp.up_proj) is type(from_files.model.layers[0].mlp.up_proj)
    assert from_memory.model.embed_tokens.weight.data_ptr() == model16.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(from_memory(ids).logits, from_files(ids).logits)
        assert torch.equal(model16(ids).logits, before), "loading from memory changed the 16-bit model"
    assert not hasattr(model16.config, "quantization_config"), "the 16-bit model's config was changed"


def test_names_the_loader_does_not_take_back_give_none(tiny_source, monkeypatch):
    model16 = load_model(tiny_source)
    weights = {k: v for k, v in model16.state_dict().items() if "norm" not in k}
    monkeypatch.setattr(model16, "state_dict", lambda: weights)
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None


def test_a_model_with_weights_not_in_memory_gives_none(tiny_source):
    model16 = load_model(tiny_source)
    model16.model.norm.weight = torch.nn.Parameter(torch.empty_like(model16.model.norm.weight, device="meta"))
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None
