"""Turn a module's weight and its streamed input statistics into table rows, one per format.

Everything here runs after the calibration pass, one module at a time: the weight is rounded
by bitsandbytes for each format, and the output error follows from the Gram matrix exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import BYTES_16BIT, FourBit
from .gram import UpperGram, product_dtype, quadratic_diag, upper_elements
from .modules import ModuleInfo
from .packed import PackedWeights
from .probe import InputStats
from .row_chunks import row_chunks

#: an input channel is an outlier when its max |x| exceeds this multiple of the median channel's
OUTLIER_FACTOR = 10.0
#: a 4-bit entry whose round-trip weight error exceeds this multiple of blocksize 64's is implausible
#: (bitsandbytes 0.50.2's CPU quantize_4bit is wrong at blocksize >= 128 on some shapes)
GUARD_FACTOR = 1.5


#: float32 elements of one row chunk: the measurement's work space is a few chunks plus one
#: round trip, whatever the weight's size (an lm_head of 128k words × 4096 is 0.5 G elements)
CHUNK_ELEMENTS = 1 << 21
#: peak bytes per weight element of one bitsandbytes 4-bit round trip: bitsandbytes' CPU kernels
#: keep float32 copies (14.3 bytes measured on a 49152×576 bf16 weight); on CUDA the packed
#: weight, its state and the bf16 restore (about 2.6 bytes), rounded up
ROUNDTRIP_BYTES_PER_PARAM = {"cpu": 15, "cuda": 4}


def measure_work_bytes(params: int, device_type: str = "cpu", *, roundtrip: bool = True, width: int = 0) -> int:
    """Work space of :func:`measure_module` on a ``params``-element weight: one bitsandbytes round trip (unless
    ``roundtrip=False``: a module only described, e.g. a tied embedding), four float32 row chunks, and for an input
    ``width`` > 0 its Gram matrix rounded to bf16 (:meth:`analysis.gram.UpperGram.rounded`; counted whatever the
    dtype: the estimate errs high)."""
    per_param = ROUNDTRIP_BYTES_PER_PARAM.get(device_type, max(ROUNDTRIP_BYTES_PER_PARAM.values()))
    rounded_gram = 2 * upper_elements(width) if width else 0
    return (params * per_param if roundtrip else 0) + 4 * 4 * min(params, CHUNK_ELEMENTS) + rounded_gram


def measure_module(info: ModuleInfo, weight: torch.Tensor, stats: InputStats | None, formats,
                   reason: str | None, grad_sq: torch.Tensor | None = None, energy: float | None = None,
                   packed: PackedWeights | None = None) -> list[dict]:
    """Rows (one per format) for one module: identity, bytes, weight error, output error.

    The weight is read in chunks of output rows (:data:`CHUNK_ELEMENTS`), so beside the weight
    the work space is one bitsandbytes round trip (bf16) plus a few float32 chunks. ``energy`` is ‖XWᵀ‖² over the
    Gram matrix's tokens where the calibration pass summed it (:mod:`analysis.output_energy`); else it is
    computed from the Gram matrix here. ``packed``: where each 4-bit round trip's packed weight is kept for the
    steps after the analysis (:mod:`analysis.packed`), and taken from when made before.
    """
    weight = weight.detach()
    moments = weight_moments(weight)
    base = identity_columns(info, reason)
    base.update(moments.columns())
    base.update(input_columns(stats))
    reference = float("nan")
    if stats is not None and reason is None:
        reference = energy if energy is not None else _output_energy(weight, stats)
    guard = _RoundTripGuard(moments.norm)
    rows = {}
    # blocksize-64 formats first: the guard's reference for the others is then their own round trip, never a second one
    for index in sorted(range(len(formats)), key=lambda i: not _RoundTripGuard.is_reference(formats[i])):
        fmt = formats[index]
        row = rows[index] = dict(base, format=fmt.name, bits=fmt.bits)
        unsupported = reason or fmt.unsupported_reason(info.shape)
        if unsupported is None:
            made = packed.get(info.name, fmt, weight) if packed is not None and isinstance(fmt, FourBit) else None
            restored, nbytes = fmt.roundtrip(weight, made) if made is not None else fmt.roundtrip(weight)
            errors = _DeltaErrors.of(weight, restored, stats, grad_sq)
            del restored
            unsupported = guard.implausible(fmt, errors.norm, weight)
        row["supported"] = unsupported is None
        row["unsupported_reason"] = unsupported or ""
        if unsupported is None:
            row.update(bytes=nbytes, footprint_bytes=fmt.footprint_bytes(info.shape))
            row.update(errors.columns(guard.norm, stats, reference))
        else:
            row.update(bytes=info.params * BYTES_16BIT, footprint_bytes=info.params * BYTES_16BIT)
            row.update({c: float("nan") for c in ERROR_COLUMNS})
    return [rows[index] for index in range(len(formats))]


class _RoundTripGuard:
    """Flags a 4-bit round trip whose weight error is implausible next to the same quant type at blocksize 64."""

    def __init__(self, norm: float):
        self.norm = norm  # ‖W‖ (WeightMoments.norm: no pass of its own)
        self.reference: dict[str, float] = {}  # quant type -> relative weight error at blocksize 64

    @staticmethod
    def is_reference(fmt) -> bool:
        """Whether ``fmt`` is a reference the others are compared with (4-bit at blocksize 64)."""
        return isinstance(fmt, FourBit) and fmt.blocksize == 64

    def implausible(self, fmt, delta_norm: float, weight: torch.Tensor) -> str | None:
        """Why this round trip is not offered (None if plausible); blocksize 64 is the reference itself."""
        if not isinstance(fmt, FourBit) or self.norm == 0:
            return None
        error = delta_norm / self.norm
        if self.is_reference(fmt):
            self.reference[fmt.quant_type] = error
            return None
        if fmt.quant_type not in self.reference:
            reference = FourBit(fmt.quant_type, 64, fmt.double_quant)
            if reference.unsupported_reason(tuple(weight.shape)):
                return None  # no blocksize-64 reference exists for this shape: nothing to compare with
            restored, _ = reference.roundtrip(weight)
            self.reference[fmt.quant_type] = _DeltaErrors.of(weight, restored, None, None).norm / self.norm
        limit = GUARD_FACTOR * self.reference[fmt.quant_type]
        if error > limit:
            return (f"bitsandbytes' {fmt.name} round trip is implausible here: relative weight error {error:.3g} > "
                    f"{GUARD_FACTOR}x blocksize 64's {self.reference[fmt.quant_type]:.3g} (a known bitsandbytes CPU "
                    "bug at some shapes): not offered for this module")
        return None


class _DeltaErrors:
    """Sums over row chunks of ΔW = W − Ŵ: its norm and max, its output error from the Gram matrix
    (in total and weighted by the output channels' mean squared gradient) and the sample's max error."""

    def __init__(self, has_fisher: bool = False, has_sample: bool = False):
        self.squares = 0.0
        self.max_abs = 0.0
        self.output = 0.0
        self.fisher = 0.0
        self.sample_max = 0.0
        self.rows = 0
        self.has_fisher, self.has_sample = has_fisher, has_sample

    @property
    def norm(self) -> float:
        return math.sqrt(self.squares)

    @classmethod
    def of(cls, weight: torch.Tensor, restored: torch.Tensor, stats: InputStats | None,
           grad_sq: torch.Tensor | None) -> _DeltaErrors:
        """Accumulate every statistic of ``weight − restored`` one row chunk at a time. The weight's error norm and
        max are float32; the output errors' products run in :func:`analysis.gram.product_dtype` of the weight (bf16 for
        a bf16 weight on bf16 hardware: ΔW and the sampled inputs rounded once, module totals within ~1e-3). The totals
        stay on the weight's device until the end: on a GPU one wait per round trip, not several per row chunk."""
        measured = stats is not None and stats.tokens > 0
        product = product_dtype(weight)
        sample = stats.sample.to(weight.device, product) if measured and stats.sample is not None else None
        errors = cls(has_fisher=grad_sq is not None, has_sample=sample is not None)
        gram = stats.gram.to(weight.device).rounded(product) if measured else None  # once, not per row chunk
        squares, max_abs, output, fisher, sample_max = torch.zeros(5, dtype=torch.float64, device=weight.device)
        for w, r in zip(row_chunks(weight, CHUNK_ELEMENTS), row_chunks(restored, CHUNK_ELEMENTS), strict=True):
            delta = w.float() - r.float()
            squares = squares + _sum(delta.square())
            max_abs = torch.maximum(max_abs, _abs_max(delta))
            if measured:
                low = delta.to(product)
                per_output = _per_output(low, gram, product)
                output = output + per_output.sum()
                if grad_sq is not None:
                    rows = grad_sq[errors.rows:errors.rows + delta.shape[0]]
                    fisher = fisher + (per_output * rows.to(per_output)).sum()
                if sample is not None:
                    sample_max = torch.maximum(sample_max, _abs_max(sample @ low.T))
            errors.rows += delta.shape[0]
        totals = torch.stack([squares, max_abs, output, fisher, sample_max]).tolist()
        errors.squares, errors.max_abs, errors.output, errors.fisher, errors.sample_max = totals
        return errors

    def columns(self, weight_norm: float, stats: InputStats | None, reference: float) -> dict:
        """The table's error columns for this round trip."""
        columns = {"weight_rel_error": self.norm / weight_norm if weight_norm > 0 else float("nan"),
                   "weight_max_abs_error": self.max_abs}
        if stats is None or stats.tokens == 0:
            columns.update({c: float("nan") for c in ERROR_COLUMNS[2:]})
            return columns
        error = self.output
        columns["output_fisher_error"] = self.fisher if self.has_fisher else float("nan")
        columns["output_rel_error"] = error / reference if reference > 0 else (0.0 if error == 0 else math.inf)
        columns["output_mse"] = error / (stats.tokens * self.rows)
        columns["output_max_abs_error"] = self.sample_max if self.has_sample else float("nan")
        return columns


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


@dataclass(frozen=True)
class WeightMoments:
    """A weight's entries summed up once: their count, mean, central second and fourth power sums and max |w|."""

    count: int
    mean: float
    second: float  # Σ (w − mean)²
    fourth: float  # Σ (w − mean)⁴
    absmax: float

    @property
    def norm(self) -> float:
        """‖W‖ = √(Σ (w − mean)² + count·mean²): both terms are ≥ 0, so nothing cancels."""
        return math.sqrt(self.second + self.count * self.mean ** 2)

    def columns(self) -> dict:
        """max|w|/std and (Pearson) kurtosis of the weight: heavy tails hurt blockwise 4-bit."""
        var = self.second / self.count if self.count else 0.0
        std = math.sqrt(var)
        return {
            "weight_absmax_over_std": self.absmax / std if std > 0 else float("nan"),
            "weight_kurtosis": (self.fourth / self.count) / var ** 2 if std > 0 else float("nan"),
        }


def weight_moments(weight: torch.Tensor) -> WeightMoments:
    """The :class:`WeightMoments` of ``weight``: two passes over row chunks (the mean, then the centred powers)."""
    weight = weight.detach()
    count = weight.numel()
    if count == 0:
        return WeightMoments(0, 0.0, 0.0, 0.0, 0.0)
    zero = torch.zeros((), dtype=torch.float64, device=weight.device)  # totals on the weight's device (see _DeltaErrors)
    mean = float(sum((_sum(c.float()) for c in row_chunks(weight, CHUNK_ELEMENTS)), zero)) / count
    second = fourth = absmax = zero
    for chunk in row_chunks(weight, CHUNK_ELEMENTS):
        squared = (chunk.float() - mean).square_()
        second = second + _sum(squared)
        fourth = fourth + _sum(squared.square_())
        absmax = torch.maximum(absmax, _abs_max(chunk))
    second, fourth, absmax = torch.stack([second, fourth, absmax]).tolist()
    return WeightMoments(count, mean, second, fourth, absmax)


def _sum(chunk: torch.Tensor) -> torch.Tensor:
    """Σ of a row chunk as a float64 scalar tensor: float32 sums along its rows, float64 across them (as accurate, a
    third of the time)."""
    return chunk.sum(dim=-1).sum(dtype=torch.float64)


def _abs_max(chunk: torch.Tensor) -> torch.Tensor:
    """max |x| of a non-empty chunk from its min and max (no |x| copy), as a float64 scalar tensor (exact)."""
    low, high = torch.aminmax(chunk)
    return torch.maximum(-low, high).double()


def input_columns(stats: InputStats | None) -> dict:
    """Input activation statistics: max |x|, outlier-channel ratio and count, token counts."""
    if stats is None or stats.tokens == 0:
        return {"input_max_abs": float("nan"), "input_outlier_ratio": float("nan"),
                "input_outlier_channels": 0, "tokens": 0,
                "nonfinite_tokens": stats.nonfinite_tokens if stats else 0}
    absmax = stats.channel_absmax.float()
    median = absmax.median()
    outliers = (absmax > OUTLIER_FACTOR * median).sum()
    median, largest, outliers = torch.stack([median, absmax.max(), outliers.float()]).tolist()  # one GPU wait
    return {
        "input_max_abs": largest,
        "input_outlier_ratio": largest / median if median > 0 else float("inf"),
        "input_outlier_channels": int(outliers),
        "tokens": stats.tokens,
        "nonfinite_tokens": stats.nonfinite_tokens,
    }


def _output_energy(weight: torch.Tensor, stats: InputStats) -> float:
    """‖XWᵀ‖² = tr(W·G·Wᵀ) from the Gram matrix, one row chunk at a time, in float32 products: the reference the
    output errors are divided by, made once per module (where the calibration pass did not sum it: lm_head)."""
    gram = stats.gram.to(weight.device)
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for chunk in row_chunks(weight, CHUNK_ELEMENTS):
        total = total + _per_output(chunk, gram, torch.float32).sum()
    return float(total)


def _per_output(m: torch.Tensor, gram: UpperGram, product: torch.dtype) -> torch.Tensor:
    """diag(M·G·Mᵀ): each output channel's summed squared response, over the Gram matrix's stored upper blocks
    (:func:`analysis.gram.quadratic_diag`: about half the multiply-adds of ``(M @ G) * M``), the products in
    ``product``: float32, or bf16 for a bf16 weight on bf16 hardware (:func:`analysis.gram.product_dtype`: a third of
    the time, module totals within ~1e-3); the blocks add up in float64."""
    return quadratic_diag(m, gram, product)
