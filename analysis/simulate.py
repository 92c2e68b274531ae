"""Simulated quantization: swap a 16-bit model's weights for bitsandbytes' round trip, then restore.

On CPU a bitsandbytes ``Linear4bit`` de-quantizes its weight to the compute dtype and runs a
plain matmul, so a 16-bit model whose weight is replaced by ``dequantize_4bit(quantize_4bit(W))``
computes (up to summation order) what the quantized model computes. That lets the comparison
measure many variants (heuristic baselines, one module at a time) from one loaded model,
without a bitsandbytes load per variant. The report states how closely the simulation
tracks a real bitsandbytes load (the all-4-bit check).

Quantizing is the slow half (≈10 s for SmolLM2's 210 Linears on 2 cores), de-quantizing is
fast, so :class:`QuantCache` keeps the packed 4-bit weights (a quarter of the 16-bit size)
and de-quantizes on each swap. A module may be swapped in another 4-bit format than the cache's
own (a per-module blocksize menu): ``quantized(names, formats={name: FourBit})``.

Two ways to swap. :meth:`QuantCache.quantized` replaces the weights for the whole block (what a
gradient pass needs: the round-tripped weight is the parameter autograd sees). :meth:`QuantCache.set_quantized`,
what the forward-only comparisons use, round-trips a module only while it runs (a forward pre-hook
de-quantizes, a forward hook puts the 16-bit weight back): one module's round trip is alive at a time
instead of a whole variant's beside the 16-bit weights (SmolLM2 in fp32: 0.43 GB for all-4-bit), for
one de-quantization per module run (≈ 0.3 s per SmolLM2 forward on one core, a few % of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from quantplan.analysis.formats import FourBit
from quantplan.analysis.packed import PackedWeights


class QuantCache:
    """Packed 4-bit weights of a model's Linears (in ``fmt`` unless told otherwise), quantized once on first use."""

    def __init__(self, model: nn.Module, fmt: FourBit, packed: PackedWeights | None = None):
        """``packed``: the packed weights made before for this model (by the analysis or another cache), reused."""
        self.model = model
        self.format = fmt
        self.modules = dict(model.named_modules())
        self._packed = packed if packed is not None else PackedWeights()
        self._originals: dict[str, torch.Tensor] = {}  # 16-bit weights swapped out while round-tripped
        self._current: dict[str, FourBit] = {}  # the format each module set by `set_quantized` computes in
        self._hooks: dict[str, tuple] = {}  # the hook handles `set_quantized` made, per module

    def original(self, name: str) -> torch.Tensor:
        """The 16-bit weight of ``name``, also while it is swapped for its round trip."""
        return self._originals.get(name, self.modules[name].weight.data)

    def drop_packed(self) -> None:
        """Drop the packed weights this cache reads (a shared :class:`PackedWeights` is emptied): no one round-trips
        this model any more, and its next user needs the memory."""
        self._packed.clear()

    def restored(self, name: str, fmt: FourBit | None = None) -> torch.Tensor:
        """The weight of ``name`` as bitsandbytes would restore it from ``fmt`` (default: the cache's format)."""
        import bitsandbytes.functional as bnbf

        weight = self.modules[name].weight
        packed, state = self._packed.get(name, fmt or self.format, self.original(name))
        return bnbf.dequantize_4bit(packed, state).to(weight.dtype).view_as(weight)

    def set_quantized(self, names, formats: Mapping[str, FourBit] | None = None) -> None:
        """Make exactly ``names`` compute with round-tripped weights (each in ``formats[name]`` where
        given, else the cache's format) whenever they run, until the next call; ``set_quantized(())``
        makes every module 16-bit again.

        Each module's round trip is de-quantized when it runs and dropped when it returns (forward
        hooks), so the weights themselves stay 16-bit between forwards and one module's copy is alive at
        a time. Only the modules whose format changes since the previous call get new hooks.
        """
        formats = formats or {}
        wanted = {name: formats.get(name) or self.format for name in dict.fromkeys(names)}
        for name in [n for n in self._hooks if self._current.get(n) != wanted.get(n)]:
            for handle in self._hooks.pop(name):
                handle.remove()
            self._current.pop(name)
        for name, fmt in wanted.items():
            if name not in self._hooks:
                self._current[name] = fmt
                self._hooks[name] = self._round_trip_while_running(name, fmt)

    def _round_trip_while_running(self, name: str, fmt: FourBit) -> tuple:
        """Hooks that give ``name`` its round trip in ``fmt`` for the length of each of its forwards."""
        module = self.modules[name]

        def swap_in(module, args):
            restored = self.restored(name, fmt)
            self._originals[name] = module.weight.data
            module.weight.data = restored

        def swap_back(module, args, output):
            if name in self._originals:
                module.weight.data = self._originals.pop(name)

        return (module.register_forward_pre_hook(swap_in),
                module.register_forward_hook(swap_back, always_call=True))

    @contextmanager
    def quantized(self, names, formats: Mapping[str, FourBit] | None = None):
        """Within the block, the modules in ``names`` compute with their round-tripped weights, each in
        ``formats[name]`` where given, else in the cache's format."""
        formats = formats or {}
        swapped = []
        try:
            for name in names:
                if name in self._originals or name in self._hooks:
                    raise RuntimeError(f"{name} is already quantized: QuantCache.quantized blocks do not nest, "
                                       "nor run inside set_quantized (call set_quantized(()) first)")
                restored = self.restored(name, formats.get(name))
                self._originals[name] = self.modules[name].weight.data
                swapped.append(name)
                self.modules[name].weight.data = restored
            yield self.model
        finally:
            for name in swapped:
                self.modules[name].weight.data = self._originals.pop(name)
