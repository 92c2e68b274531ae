"""The scoreboard's footprints are the 16-bit checkpoint's, whatever dtype the scoreboard ran its models in."""

import torch
from tiny import tiny_llama

from quantplan.analysis.memory import footprint_16bit


def test_an_fp32_model_reports_its_bf16_footprint():
    model = tiny_llama(layers=2)
    bf16 = model.to(torch.bfloat16).get_memory_footprint()
    buffers32 = sum(b.numel() for b in model.float().buffers())  # fp32 buffers: 2 more bytes each
    assert footprint_16bit(model.float()) == bf16 + 2 * buffers32
    assert footprint_16bit(model.to(torch.bfloat16)) == model.get_memory_footprint()
    assert model.float().get_memory_footprint() > 1.9 * bf16  # what the scoreboard reported before
