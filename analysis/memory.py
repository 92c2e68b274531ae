"""Bytes of everything in a model that is not a candidate Linear weight.

Embeddings, norms, biases and buffers stay as they are whatever the plan says; the memory
model adds them once (tied weights once) to the planned modules' bytes. Floating-point
parameters are counted at 2 bytes (the exported model's 16-bit compute dtype); buffers at
their own element size, as ``get_memory_footprint`` sees them after loading.
"""

from __future__ import annotations

from torch import nn

from .formats import BYTES_16BIT


def non_module_bytes(model: nn.Module, linear_names: list[str]) -> dict:
    """``{"storage": checkpoint bytes, "footprint": get_memory_footprint bytes}`` outside the Linear weights."""
    modules = dict(model.named_modules())
    excluded = {id(modules[n].weight) for n in linear_names}
    params = 0
    seen = set()
    for p in model.parameters():  # unique parameters: tied weights count once
        if id(p) in excluded or id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel() * (BYTES_16BIT if p.is_floating_point() else p.element_size())
    persistent = 0
    every_buffer = 0
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            size = buf.numel() * buf.element_size()
            every_buffer += size
            if name not in module._non_persistent_buffers_set:
                persistent += size
    return {"storage": params + persistent, "footprint": params + every_buffer}


def footprint_16bit(model: nn.Module) -> int:
    """``model.get_memory_footprint()`` as the model takes it in its 16-bit compute dtype, whatever dtype it was
    loaded in: floating-point parameters at 2 bytes (the rule above), packed 4-bit / 8-bit parameters and every
    buffer at their own size. The scoreboard runs its models in fp32 on CPUs without native bf16 (``--dtype
    auto``); the footprint it reports is the one users of the checkpoint get."""
    params = sum(p.numel() * (BYTES_16BIT if p.is_floating_point() else p.element_size()) for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())
