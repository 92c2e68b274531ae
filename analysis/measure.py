"""Turn a module's weight and its streamed input statistics into table rows, one per format.

Everything here runs after the calibration pass, one module at a time: the weight is rounded
by bitsandbytes for each format, and the output error follows from the Gram matrix exactly.
"""

from __future__ import annotations

import math

import torch

from .formats import BYTES_16BIT
from .modules import ModuleInfo
from .probe import InputStats

#: an input channel is an outlier when its max |x| exceeds this multiple of the median channel's
OUTLIER_FACTOR = 10.0


def measure_module(info: ModuleInfo, weight: torch.Tensor, stats: InputStats | None, formats,
                   reason: str | None, grad_sq: torch.Tensor | None = None) -> list[dict]:
    """Rows (one per format) for one module: identity, bytes, weight error, output error."""
    base = identity_columns(info, reason)
    base.update(weight_outlier_columns(weight))
    base.update(input_columns(stats))
    rows = []
    w = weight.detach().float()
    reference = _output_energy(w, stats) if stats is not None and reason is None else float("nan")
    for fmt in formats:
        row = dict(base, format=fmt.name, bits=fmt.bits)
        unsupported = reason or fmt.unsupported_reason(info.shape)
        row["supported"] = unsupported is None
        row["unsupported_reason"] = unsupported or ""
        if unsupported is None:
            restored, nbytes = fmt.roundtrip(weight.detach())
            delta = w - restored.float()
            row.update(bytes=nbytes, footprint_bytes=fmt.footprint_bytes(info.shape))
            row.update(_error_columns(w, delta, stats, reference, grad_sq))
        else:
            row.update(bytes=info.params * BYTES_16BIT, footprint_bytes=info.params * BYTES_16BIT)
            row.update({c: float("nan") for c in ERROR_COLUMNS})
        rows.append(row)
    return rows


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
