"""The 16-bit model loaded once per run and lent to every step that runs it.

A ``quantplan run`` whose analysis runs in memory needs the same 16-bit model four times: the
analysis, the never-worse verification, the refinement and the fidelity scoreboard. Each used to load
it again (seconds on SmolLM2, minutes for a 70B model read from disk). :class:`SharedModel` loads it
on first use, in the analysis dtype and device, and hands out the same object until the run releases
it. Every step leaves the weights as it found them (the simulated variants swap round-tripped weights
in and back, the Fisher and refinement passes restore ``requires_grad``); tests/test_shared_model.py
checks the weights after a whole run. With the model it lends the packed 4-bit weights the analysis made
(:class:`~analysis.packed.PackedWeights`), so the verification and the scoreboard de-quantize instead of quantizing
every Linear again; and the 16-bit last hidden states the analysis' calibration pass computed on the first
batches (:class:`~analysis.kept_hidden.KeptHidden`), so the verification does not run the 16-bit model over them
again. A streamed run (``--max-memory``) never holds the whole model
and does not use it; the export reads the checkpoint from disk (transformers quantizes while loading).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from torch import nn

from quantplan.analysis.equalize import Equalization, apply_equalization
from quantplan.analysis.kept_hidden import KeptHidden
from quantplan.analysis.models import ModelSource, dtype_from_name, load_model
from quantplan.analysis.packed import PackedWeights
from quantplan.common.profile import stage


@dataclass
class SharedModel:
    """One 16-bit model of ``source`` in ``dtype`` on ``device``, loaded at the first :meth:`get`."""

    source: ModelSource
    dtype: str
    device: str
    loads: int = 0  # how many times the weights were read (1 in a whole run)
    _model: nn.Module | None = field(default=None, repr=False)
    #: the packed 4-bit weights the analysis made, de-quantized by the verification and the scoreboard
    packed: PackedWeights = field(default_factory=PackedWeights, repr=False)
    #: the analysis' 16-bit last hidden states of the batches the verification reads (none kept by default)
    hidden: KeptHidden = field(default_factory=KeptHidden, repr=False)
    #: the channel scales of the run's table, applied to the weights whenever they are read (the analysis applies
    #: them itself to the model it borrows)
    equalization: Equalization = field(default_factory=Equalization, repr=False)

    def get(self) -> nn.Module:
        """The loaded model (loading it now if no step has yet), with the run's channel scales."""
        if self._model is None:
            with stage("load model"):
                self._model = load_model(self.source, dtype=dtype_from_name(self.dtype), device=self.device)
                apply_equalization(self._model, self.equalization)
            self.loads += 1
        return self._model

    def serves(self, dtype: str, device: str) -> bool:
        """Whether a step that wants the model in ``dtype`` on ``device`` can borrow this one."""
        return (dtype, str(device)) == (self.dtype, str(self.device))

    def export_reuse(self):
        """For the export (:func:`planner.export.export`'s ``reuse``): the packed weight the analysis made for a
        weight key, where the values the export read equal the loaded weight's (:meth:`PackedWeights.made_for`); None
        while no model is loaded (nothing was made)."""
        if self._model is None:
            return None
        params = dict(self._model.named_parameters(remove_duplicate=False))
        packed = self.packed

        def reuse(key: str, fmt, values):
            weight = params.get(key)
            return None if weight is None else packed.made_for(key.removesuffix(".weight"), fmt, weight, values)
        return reuse

    def release(self) -> None:
        """Drop the model, its packed weights and kept states (the run's remaining steps do not need them)."""
        self._model = None
        self.packed = PackedWeights()
        self.hidden = KeptHidden()
        gc.collect()
