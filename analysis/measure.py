"""Turn a module's weight and its streamed input statistics into table rows, one per format.

Everything here runs after the calibration pass, one module at a time: the weight is rounded
by bitsandbytes for each format, and the output error follows from the Gram matrix exactly.
"""

from __future__ import annotations

import math

import torch

from .formats import BYTES_16BIT, FourBit
from .modules import ModuleInfo
from .probe import InputStats

#: an input channel is an outlier when its max |x| exceeds this multiple of the median channel's
OUTLIER_FACTOR = 10.0
#: a 4-bit entry whose round-trip weight error exceeds this multiple of blocksize 64's is implausible
#: (bitsandbytes 0.50.2's CPU quantize_4bit is wrong at blocksize >= 128 on some shapes)
GUARD_FACTOR = 1.5


def measure_module(info: ModuleInfo, weight: torch.Tensor, stats: InputStats | None, formats,
                   reason: str | None, grad_sq: torch.Tensor | None = None) -> list[dict]:
    """Rows (one per format) for one module: identity, bytes, weight error, output error."""
    base = identity_columns(info, reason)
    base.update(weight_outlier_columns(weight))
    base.update(input_columns(stats))
    rows = []
    w = weight.detach().float()
    reference = _output_energy(w, stats) if stats is not None and reason is None else float("nan")
    guard = _RoundTripGuard(w)
    for fmt in formats:
        row = dict(base, format=fmt.name, bits=fmt.bits)
        unsupported = reason or fmt.unsupported_reason(info.shape)
        if unsupported is None:
            restored, nbytes = fmt.roundtrip(weight.detach())
            delta = w - restored.float()
            unsupported = guard.implausible(fmt, delta, weight)
        row["supported"] = unsupported is None
        row["unsupported_reason"] = unsupported or ""
        if unsupported is None:
            row.update(bytes=nbytes, footprint_bytes=fmt.footprint_bytes(info.shape))
            row.update(_error_columns(w, delta, stats, reference, grad_sq))
        else:
            row.update(bytes=info.params * BYTES_16BIT, footprint_bytes=info.params * BYTES_16BIT)
            row.update({c: float("nan") for c in ERROR_COLUMNS})
        rows.append(row)
    return rows


class _RoundTripGuard:
    """Flags a 4-bit round trip whose weight error is implausible next to the same quant type at blocksize 64."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.norm = w.norm().item()
        self.reference: dict[str, float] = {}  # quant type -> relative weight error at blocksize 64

    def implausible(self, fmt, delta: torch.Tensor, weight: torch.Tensor) -> str | None:
        """Why this round trip is not offered (None if plausible); blocksize 64 is the reference itself."""
        if not isinstance(fmt, FourBit) or self.norm == 0:
            return None
        error = delta.norm().item() / self.norm
        if fmt.blocksize == 64:
            self.reference[fmt.quant_type] = error
            return None
        if fmt.quant_type not in self.reference:
            reference = FourBit(fmt.quant_type, 64, fmt.double_quant)
            if reference.unsupported_reason(tuple(weight.shape)):
                return None  # no blocksize-64 reference exists for this shape: nothing to compare with
            restored, _ = reference.roundtrip(weight.detach())
            self.reference[fmt.quant_type] = (self.w - restored.float()).norm().item() / self.norm
        limit = GUARD_FACTOR * self.reference[fmt.quant_type]
        if error > limit:
            return (f"bitsandbytes' {fmt.name} round trip is implausible here: relative weight error {error:.3g} > "
                    f"{GUARD_FACTOR}x blocksize 64's {self.reference[fmt.quant_type]:.3g} (a known bitsandbytes CPU "
                    "bug at some shapes): not offered for this module")
        return None


ERROR_COLUMNS = ("weight_rel_error", "weight_max_abs_error", "output_rel_error", "output_mse",
                 "output_max_abs_error", "output_fisher_error")


def identity_columns(info: ModuleInfo, reason: str | None) -> dict:
    """Name, group, layer, type, shape, parameter count and 16-bit bytes of a module."""
    return {
        "name": info.name,
        "group": info.group,
        "layer": info.layer,
        "module_type": info.module_type,
        "kind": info.kind,
        "out_features": info.out_features,
        "in_features": info.in_features,
        "params": info.params,
        "bytes_16bit": info.params * BYTES_16BIT,
        "quantizable": reason is None,
        "reason": reason or "",
    }


def weight_outlier_columns(weight: torch.Tensor) -> dict:
    """max|w|/std and (Pearson) kurtosis of the weight: heavy tails hurt blockwise 4-bit."""
    w = weight.detach().float().flatten()
    centered = w - w.mean()
    var = centered.pow(2).mean()
    std = var.sqrt().item()
    return {
        "weight_absmax_over_std": (w.abs().max().item() / std) if std > 0 else float("nan"),
        "weight_kurtosis": (centered.pow(4).mean() / var.pow(2)).item() if std > 0 else float("nan"),
    }


def input_columns(stats: InputStats | None) -> dict:
    """Input activation statistics: max |x|, outlier-channel ratio and count, token counts."""
    if stats is None or stats.tokens == 0:
        return {"input_max_abs": float("nan"), "input_outlier_ratio": float("nan"),
                "input_outlier_channels": 0, "tokens": 0,
                "nonfinite_tokens": stats.nonfinite_tokens if stats else 0}
    absmax = stats.channel_absmax.float()
    median = absmax.median().item()
    return {
        "input_max_abs": absmax.max().item(),
        "input_outlier_ratio": absmax.max().item() / median if median > 0 else float("inf"),
        "input_outlier_channels": int((absmax > OUTLIER_FACTOR * median).sum()),
        "tokens": stats.tokens,
        "nonfinite_tokens": stats.nonfinite_tokens,
    }


def _output_energy(w: torch.Tensor, stats: InputStats) -> float:
    """‖XWᵀ‖² = tr(W·G·Wᵀ) from the Gram matrix."""
    return _quadratic(w, stats.gram)


def _quadratic(m: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(M·G·Mᵀ) = Σ (M·G) ∘ M, summed in float64."""
    return float(_per_output(m, gram).sum())


def _per_output(m: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """diag(M·G·Mᵀ): each output channel's summed squared response.

    The product runs in float32 (G is positive semi-definite, so the quadratic form has no
    cancellation; float32 keeps ~1e-6 relative accuracy at half the cost of float64)."""
    m32 = m.float()
    return ((m32 @ gram.to(m32.device, torch.float32)) * m32).sum(dim=1, dtype=torch.float64)


def _error_columns(w: torch.Tensor, delta: torch.Tensor, stats: InputStats | None, reference: float,
                   grad_sq: torch.Tensor | None) -> dict:
    norm = w.norm().item()
    columns = {
        "weight_rel_error": delta.norm().item() / norm if norm > 0 else float("nan"),
        "weight_max_abs_error": delta.abs().max().item(),
    }
    if stats is None or stats.tokens == 0:
        columns.update({c: float("nan") for c in ERROR_COLUMNS[2:]})
        return columns
    per_output = _per_output(delta, stats.gram)
    error = float(per_output.sum())
    columns["output_fisher_error"] = (
        float((per_output * grad_sq.to(per_output)).sum()) if grad_sq is not None else float("nan"))
    columns["output_rel_error"] = error / reference if reference > 0 else (0.0 if error == 0 else math.inf)
    columns["output_mse"] = error / (stats.tokens * delta.shape[0])
    sample = stats.sample.to(delta.device) if stats.sample is not None else None
    columns["output_max_abs_error"] = (sample @ delta.T).abs().max().item() if sample is not None else float("nan")
    return columns
