"""bitsandbytes' packed 4-bit weights of one loaded model, made once and reused by every step that round-trips them.

A ``quantplan run`` quantizes each Linear in each menu format three times over: the analysis
measures its round trip, the verification simulates the plan's variants with it, and the
scoreboard simulates the report's variants with it (≈ 10 s of bitsandbytes' CPU ``quantize_4bit``
per pass on SmolLM2, most of it ``torch.bucketize``). :class:`PackedWeights` keeps the packed weight
and quant state of each (module, format) the first time one is made, so the later steps
de-quantize what the analysis quantized. The application layer owns one per loaded 16-bit model
(:class:`quantplan.shared_model.SharedModel`) and drops it with the model.

Memory: a quarter of the 16-bit bytes of the quantized Linears per format, on the weights'
device (SmolLM2, two formats: ~0.11 GB), the same copies a :class:`~analysis.simulate.QuantCache`
of the verification holds anyway. Valid while the weights are those it was made from: an entry
made from another tensor (a reloaded weight) is made again; weights edited in place are not
detected, so a store is only shared by steps that leave the weights as they found them.
"""

from __future__ import annotations

import torch

from .formats import FourBit


class PackedWeights:
    """(module name, 4-bit format) -> bitsandbytes' (packed weight, quant state), each made on first request."""

    def __init__(self):
        self._entries: dict[tuple[str, FourBit], tuple[int, tuple]] = {}

    def get(self, name: str, fmt: FourBit, weight: torch.Tensor) -> tuple:
        """``fmt.quantize(weight)`` for module ``name``: the one made before from the same tensor, or made now."""
        key = (name, fmt)
        made = self._entries.get(key)
        if made is None or made[0] != weight.data_ptr():
            made = self._entries[key] = (weight.data_ptr(), fmt.quantize(weight))
        return made[1]

    def clear(self) -> None:
        """Drop every packed weight (the last step that round-trips is done with them)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
