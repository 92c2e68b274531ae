"""The scoreboard's baseline where the plans hold channel-scaled weights: all-4-bit of the source's own weights.

With equalization (:mod:`analysis.equalize`) every simulated row of the scoreboard runs on the scaled weights the
checkpoint holds, all-4-bit included; what a user gets without quantplan is plain bitsandbytes over the source
weights. This row measures that, in the same 16-bit model with its scales undone for the pass (exactly: they are
powers of two) and put back after, and the scoreboard's recovery is counted from it.
"""

from __future__ import annotations

from dataclasses import replace

from quantplan.analysis.equalize import Equalization, apply_equalization
from quantplan.analysis.simulate import QuantCache
from quantplan.planner.baselines import KeepSet

from .fidelity import measure_variants

#: what the scaled all-4-bit row's label says
EQUALIZED = ", equalized"
#: the row's note in the scoreboard
NOTE = ("the source's own weights, as plain bitsandbytes quantizes them: what the checkpoint's channel scales start "
        "from; recovery is counted from this row")


def source_all_4bit(model16, equalization: Equalization, uniform: KeepSet, reference, fmt):
    """(the keep set, its :class:`~reports.fidelity.Fidelity`) of all-4-bit over ``model16``'s unscaled weights
    (``model16`` holds ``equalization``'s scales, as :func:`reports.compare.compare` gives it)."""
    keep = replace(uniform, label=f"{uniform.label.removesuffix(EQUALIZED)}, source weights")
    apply_equalization(model16, equalization, inverse=True)
    try:
        cache = QuantCache(model16, fmt)  # no packed weights: those were made from the scaled ones
        try:
            variant = {n: uniform.formats.get(n) for n in uniform.quantized}
            measured = measure_variants(reference, cache, {"source": variant})
        finally:
            cache.set_quantized(())
            cache.drop_packed()
    finally:
        apply_equalization(model16, equalization)  # the borrowed model as it was found, whatever happened
    return keep, measured["source"]


def equalized_label(uniform: KeepSet, equalization: Equalization) -> KeepSet:
    """The all-4-bit row of the scaled weights, named so beside the source one."""
    return replace(uniform, label=f"{uniform.label}{EQUALIZED}") if equalization else uniform
