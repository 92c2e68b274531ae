"""bitsandbytes' packed 4-bit weights of one loaded model, made once and reused by every step that round-trips them.

A ``quantplan run`` quantized each Linear in each menu format up to four times over: the analysis
measures its round trip, the verification simulates the plan's variants with it, the export writes
the plan's format into the checkpoint, and the scoreboard simulates the report's variants with it
(≈ 2.5 s of bitsandbytes' CPU ``quantize_4bit`` per format and pass on SmolLM2, most of it
``torch.bucketize``). :class:`PackedWeights` keeps the packed weight and quant state of each (module,
format) the first time one is made, so the later steps de-quantize what the analysis quantized, and
the export writes it (:meth:`PackedWeights.made_for`: only where the values it reads from disk equal the
weight's it was made from). The application layer owns one per loaded 16-bit model
(:class:`quantplan.shared_model.SharedModel`) and drops it with the model.

Memory: a quarter of the 16-bit bytes of the quantized Linears per format, on the weights'
device (SmolLM2, two formats: ~0.11 GB), the same copies a :class:`~analysis.simulate.QuantCache`
of the verification holds anyway. Valid while the weights are those it was made from: an entry
made from another tensor (a reloaded weight) is made again; weights edited in place are not
detected, so a store is only shared by steps that leave the weights as they found them.
"""

from __future__ import annotations

import copy

import torch

from .formats import FourBit
from .row_chunks import row_chunks

#: elements compared at a time by :meth:`PackedWeights.made_for` (two float32 copies of this many)
COMPARE_ELEMENTS = 1 << 22


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

    def made_for(self, name: str, fmt: FourBit, weight: torch.Tensor, values: torch.Tensor) -> tuple | None:
        """The (packed weight, quant state) made before for module ``name`` from ``weight``, reused for ``values``: the
        same parameter read again (the export reads it from disk, in the checkpoint's dtype). bitsandbytes' CPU
        ``quantize_4bit`` works on the float32 upcast, so it makes the same packed bytes from ``values`` exactly when
        their float32 values are the weight's current ones; the quant state is then a copy that de-quantizes to
        ``values``' dtype. On other devices bitsandbytes runs one kernel per dtype: values in another dtype than the
        weight's are not taken there (not verified). None when nothing was made from ``weight`` or any value differs
        (e.g. a float32 source run in bf16): the caller quantizes ``values``. As for :meth:`get`, an in-place edit of
        the weight after it was packed is not detected."""
        made = self._entries.get((name, fmt))
        if made is None or made[0] != weight.data_ptr() or tuple(values.shape) != tuple(weight.shape):
            return None
        if values.dtype != weight.dtype and weight.device.type != "cpu":
            return None
        pairs = zip(row_chunks(weight.detach(), COMPARE_ELEMENTS), row_chunks(values, COMPARE_ELEMENTS), strict=True)
        for mine, theirs in pairs:
            theirs = theirs.to(mine.device)
            same = torch.equal(mine, theirs) if mine.dtype == theirs.dtype else torch.equal(mine.float(), theirs.float())
            if not same:
                return None
        packed, state = made[1]
        state = copy.copy(state)  # the kept one still de-quantizes to the weight's dtype for the scoreboard
        state.dtype = values.dtype
        return packed, state

    def clear(self) -> None:
        """Drop every packed weight (the last step that round-trips is done with them)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
