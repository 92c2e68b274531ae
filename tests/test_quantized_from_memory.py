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
    assert from_memory.generation_config.to_dict() == model16.generation_config.to_dict()


def test_names_the_loader_does_not_take_back_give_none(tiny_source, monkeypatch):
    model16 = load_model(tiny_source)
    weights = {k: v for k, v in model16.state_dict().items() if "norm" not in k}
    monkeypatch.setattr(model16, "state_dict", lambda: weights)
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None


def test_a_model_with_weights_not_in_memory_gives_none(tiny_source):
    model16 = load_model(tiny_source)
    model16.model.norm.weight = torch.nn.Parameter(torch.empty_like(model16.model.norm.weight, device="meta"))
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None


def test_generation_settings_are_the_16bit_models(tiny_source):
    """from_pretrained without a folder reads no generation_config.json: the 16-bit model's settings are copied."""
    model16 = load_model(tiny_source)
    model16.generation_config.repetition_penalty = 1.3
    model16.generation_config.eos_token_id = [2, 5]
    loaded = load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16)
    assert loaded.generation_config.repetition_penalty == 1.3 and loaded.generation_config.eos_token_id == [2, 5]


def test_a_failing_load_or_a_tensor_conversion_gives_none(tiny_source, monkeypatch):
    """Any error of the load from memory, or a checkpoint conversion that transforms tensors (it would run on
    converted ones again), sends the caller to the files."""
    import quantplan.analysis.models as models

    model16 = load_model(tiny_source)
    monkeypatch.setattr(models, "_converts_tensors", lambda model: True)
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None
    monkeypatch.undo()

    def fails(*args, **kwargs):
        raise RuntimeError("size mismatch")

    monkeypatch.setattr(type(model16), "from_pretrained", fails)
    assert load_quantized_from(model16, CONFIGS["int8"], torch.bfloat16) is None


def test_tensor_conversions_are_found_in_transformers_mappings(tiny_source):
    """A Llama's mapping only renames; a mixture-of-experts mapping with a transpose converts tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    from quantplan.analysis.models import _converts_tensors

    assert not _converts_tensors(load_model(tiny_source))
    config = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    moe = AutoModelForCausalLM.from_config(config)
    assert any(isinstance(c, WeightConverter) for c in get_model_conversion_mapping(moe))
    assert _converts_tensors(moe)
