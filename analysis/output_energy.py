"""The reference energy ‖XWᵀ‖² of each bias-free Linear, read off its outputs during the calibration pass.

The relative output error of a format is ``tr(ΔW·G·ΔWᵀ) / tr(W·G·Wᵀ)``. The denominator as a quadratic form
costs d_out·d_in² multiply-adds per module, as much as one more format (benchmarks/README.md, probe_cost.py).
It equals Σ_t ‖y_t‖² over the same tokens, y = xWᵀ the Linear's output, which the forward pass has already
made: a forward hook adds ``‖y‖²`` per call, d_out·tokens work, one read of the output (the Gram matrix
itself costs d_in²·tokens). Only finite input rows count, as in the Gram matrix (a non-finite input row makes
its output row non-finite, so a finite sum proves the rows finite, as in :mod:`analysis.finite_rows`).

Where the sum cannot stand in for the quadratic form :meth:`OutputEnergy.reference` returns None and the
measurement falls back to it: a Linear with a bias (y − b loses the digits of a small xWᵀ next to a large
bias in 16-bit), an output that overflowed, a token count that differs from the Gram matrix's (a partial
state saved before this existed, a module the probe saw in another way), and the lm_head, which callers
leave out: the streamed analysis shows the probe its input without making the logits, and both paths
must give the same table.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .hooks import module_hooks
from .probe import InputStats
from .row_chunks import row_chunks

ENERGY_KEY, TOKENS_KEY = "energy", "energytokens"


@dataclass
class OutputEnergy:
    """Σ‖y‖² and token counts per hooked Linear over finished batches (pending ones apart, as the probes keep them)."""

    model: nn.Module
    names: list[str]
    sums: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._pending: dict[str, list] = {}

    @contextmanager
    def attached(self):
        """Hook the outputs of the named bias-free modules for the duration of the block."""
        modules = dict(self.model.named_modules())
        bias_free = [n for n in self.names if getattr(modules[n], "bias", None) is None]
        with module_hooks(self.model, {n: self._hook(n) for n in bias_free}):
            yield self

    def _hook(self, name: str):
        def hook(module, args, output):
            if torch.is_tensor(output) and args and torch.is_tensor(args[0]):
                energy, count = _finite_energy(args[0].detach(), output.detach())
                pending = self._pending.setdefault(name, [0.0, 0])
                pending[0] += energy
                pending[1] += count

        return hook

    def start_batch(self) -> None:
        """Forget what a broken batch left pending."""
        self._pending.clear()

    def commit_batch(self) -> None:
        """The batch ran to the end: fold it into the totals."""
        for name, (energy, count) in self._pending.items():
            self.sums[name] = self.sums.get(name, 0.0) + energy
            self.tokens[name] = self.tokens.get(name, 0) + count
        self._pending.clear()

    def reference(self, name: str, stats: InputStats | None) -> float | None:
        """‖XWᵀ‖² of module ``name`` over the tokens of its Gram matrix, or None where it must be the quadratic form."""
        energy = self.sums.get(name)
        if stats is None or energy is None or not math.isfinite(energy) or self.tokens.get(name) != stats.tokens:
            return None
        return energy

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with the partial results (float64 sums and int64 token counts, one element each)."""
        out = {f"{n}::{ENERGY_KEY}": torch.tensor([s], dtype=torch.float64) for n, s in self.sums.items()}
        out.update({f"{n}::{TOKENS_KEY}": torch.tensor([t], dtype=torch.int64) for n, t in self.tokens.items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state` (other keys ignored: a state saved without energies leaves it empty)."""
        for key, value in tensors.items():
            name, _, kind = key.rpartition("::")
            if kind == ENERGY_KEY:
                self.sums[name] = float(value[0])
            elif kind == TOKENS_KEY:
                self.tokens[name] = int(value[0])


def _finite_energy(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(Σ‖y_t‖² over the rows t whose input x_t is finite, their count); NaN where a finite row's output overflowed."""
    outputs = y.reshape(-1, y.shape[-1]) if y.dim() else y.reshape(1, 1)
    energy = _squared_sum(outputs)
    if math.isfinite(energy):
        return energy, outputs.shape[0]
    finite = torch.isfinite(x.reshape(-1, x.shape[-1])).all(dim=1)
    if finite.shape[0] != outputs.shape[0]:
        return math.nan, 0
    energy = _squared_sum(outputs[finite])
    return (energy if math.isfinite(energy) else math.nan), int(finite.sum())


#: elements of the float32 row chunks :func:`_squared_sum` squares at a time
SQUARE_CHUNK_ELEMENTS = 1 << 18


def _squared_sum(outputs: torch.Tensor) -> float:
    """Σ y² in float32 by torch's cascade sum (~1e-7 relative on a SmolLM2 down_proj's 1024 x 576 outputs, where
    ``vector_norm`` and ``dot`` accumulate straight on and come out 1e-4 to 2e-4 low), over row chunks of about
    :data:`SQUARE_CHUNK_ELEMENTS`, each chunk's sum added in float64. The square is a product: ``square`` (a power)
    takes twice its time on the CPU. In chunks because a whole batch's float32 copy and square (6 MB each for
    SmolLM2's 1024 x 1536 MLP outputs) were fresh pages from the C library every call: 12.6 ms of page faults
    per MLP output per batch, 20x the arithmetic (measured in the calibration pass' profile, 2026-11-27)."""
    flat = outputs.reshape(-1, outputs.shape[-1]) if outputs.dim() > 1 else outputs.reshape(1, -1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)  # on the outputs' device: one GPU wait a call
    for chunk in row_chunks(flat, SQUARE_CHUNK_ELEMENTS):
        values = chunk.float()
        total += (values * values).sum()
    return float(total)
