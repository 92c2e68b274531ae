"""SensitivityTable: the measured result, a tidy pandas DataFrame plus the metadata that names it.

One row per (module, format). Saved as ``sensitivity.parquet`` (the rows) and
``sensitivity.json`` (metadata and column documentation); never pickled. A planner reading a
table checks its metadata against the model, data and formats it is asked about.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from quantplan.common.files import atomic_write_text, staged_file

COLUMNS = {
    "name": "full module name in the live module tree (model.named_modules())",
    "group": "language_model | vision_tower | projector | cross_attention | lm_head",
    "layer": "block index inside its tower (-1 outside any block)",
    "module_type": "last name component: q_proj, down_proj, fc1, ...",
    "kind": "module class (Linear, Embedding, ...)",
    "out_features": "weight rows",
    "in_features": "weight columns",
    "params": "weight elements",
    "bytes_16bit": "weight bytes kept in 16-bit",
    "quantizable": "bitsandbytes can quantize this module in at least one candidate format",
    "reason": "why not quantizable (empty when it is)",
    "format": "candidate format of this row (nf4, fp4, int8)",
    "bits": "bits per weight element of the format",
    "supported": "bitsandbytes can hold this module in this row's format",
    "unsupported_reason": "why bitsandbytes cannot hold it in this format, or why its round trip was judged implausible (empty when supported)",
    "bytes": "exact checkpoint bytes of the weight in this format (packed + absmax + nested state + metadata)",
    "footprint_bytes": "bytes model.get_memory_footprint() counts for the weight in this format",
    "weight_rel_error": "‖W−Ŵ‖_F / ‖W‖_F with Ŵ bitsandbytes' round trip",
    "weight_max_abs_error": "max |W−Ŵ|",
    "output_rel_error": "‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² over all calibration tokens (exact, from the input Gram matrix)",
    "output_mse": "‖X(W−Ŵ)ᵀ‖² / (tokens·out_features): absolute output error, grows with activation size",
    "output_fisher_error": "Σ_o mean_t(∂L/∂y_o)² · Σ_t Δy_o²: Fisher-weighted output error in next-token-loss "
                           "units (only with fisher=True / --fisher; NaN otherwise)",
    "restore_gain": "first-order decrease of the mean next-token KL divergence (nats/token) from 16-bit if this "
                    "module alone went back to 16-bit in the all-4-bit model (quantized context; only with "
                    "context=True / --context, first 4-bit format; NaN otherwise)",
    "context_output_rel_error": "‖(W−Ŵ)x̂‖² / ‖Wx̂‖² with x̂ the inputs of the all-4-bit model (upstream rounding "
                                "included; only with --context)",
    "output_max_abs_error": "max |X(W−Ŵ)ᵀ| over a sample of up to 256 input rows from the first batch",
    "weight_absmax_over_std": "max|w| / std(w): weight outliers",
    "weight_kurtosis": "E[(w−μ)⁴]/σ⁴ (3 for a Gaussian): heavy-tailed weights",
    "input_max_abs": "max |x| over calibration inputs",
    "input_outlier_ratio": "largest channel max|x| / median channel max|x|",
    "input_outlier_channels": "input channels whose max|x| exceeds 10x the median channel's",
    "tokens": "calibration tokens that reached the module",
    "nonfinite_tokens": "tokens skipped because the module's input held NaN/Inf (flagged, not fatal)",
}

TABLE_FILE = "sensitivity.parquet"
META_FILE = "sensitivity.json"


class TableMismatch(ValueError):
    """A table (or plan) was made for another model, calibration set or format set."""


@dataclass
class SensitivityTable:
    """Measured sensitivity of every module; ``df`` is tidy (module x format), ``meta`` names its origin."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def formats(self) -> list[str]:
        return [f["name"] for f in self.meta.get("formats", [])]

    @property
    def content_hash(self) -> str:
        """Hash of rows and metadata: plans record it to name the table they came from."""
        rows = pd.util.hash_pandas_object(self.df, index=False).values.tobytes()
        meta = json.dumps({k: v for k, v in self.meta.items() if k != "created"}, sort_keys=True).encode()
        return hashlib.sha256(rows + meta).hexdigest()[:16]

    def modules(self) -> pd.DataFrame:
        """One row per module (identity and outlier columns only)."""
        keep = [c for c in self.df.columns if c not in _PER_FORMAT]
        return self.df.drop_duplicates("name")[keep].reset_index(drop=True)

    def for_format(self, fmt: str) -> pd.DataFrame:
        """The rows of one format, one per module."""
        if fmt not in self.formats:
            raise KeyError(f"format {fmt!r} was not measured; this table has {self.formats}")
        return self.df[self.df["format"] == fmt].reset_index(drop=True)

    def wide(self, column: str = "output_rel_error") -> pd.DataFrame:
        """A module x format pivot of one column."""
        return self.df.pivot(index="name", columns="format", values=column)

    def save(self, folder: str | Path) -> Path:
        """Write sensitivity.parquet + sensitivity.json into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with staged_file(folder / TABLE_FILE) as tmp:
            self.df.to_parquet(tmp, index=False)
        doc = {"meta": self.meta, "columns": COLUMNS, "content_hash": self.content_hash}
        atomic_write_text(folder / META_FILE, json.dumps(doc, indent=1, default=str))
        return folder / TABLE_FILE

    @classmethod
    def load(cls, folder: str | Path) -> SensitivityTable:
        """Read a table written by :meth:`save` (``folder`` or the parquet file itself)."""
        path = Path(folder)
        if path.suffix == ".parquet":
            path = path.parent
        if not (path / TABLE_FILE).is_file() or not (path / META_FILE).is_file():
            raise FileNotFoundError(f"no {TABLE_FILE} + {META_FILE} in {path}: run `quantplan analyze --out {path}` first")
        df = pd.read_parquet(path / TABLE_FILE)
        meta = json.loads((path / META_FILE).read_text())["meta"]
        return cls(df, meta)

    def check_matches(self, model_fingerprint: str | None = None, calibration: str | None = None,
                      formats: list[str] | None = None) -> None:
        """Refuse (TableMismatch) a table made for another model, calibration set or format set."""
        checks = [
            ("model", model_fingerprint, self.meta.get("model_fingerprint")),
            ("calibration data", calibration, self.meta.get("calibration_fingerprint")),
        ]
        for what, wanted, have in checks:
            if wanted is not None and wanted != have:
                raise TableMismatch(
                    f"this sensitivity table was measured for another {what} ({have}, not {wanted}): "
                    f"re-run `quantplan analyze` for this {what}, or pass the matching table"
                )
        missing = [f for f in formats or [] if f not in self.formats]
        if missing:
            raise TableMismatch(
                f"this sensitivity table has no measurements for {missing} (it has {self.formats}): "
                f"re-run `quantplan analyze --formats {','.join(formats)}`"
            )


_PER_FORMAT = {"format", "bits", "supported", "unsupported_reason", "bytes", "footprint_bytes", "weight_rel_error",
               "weight_max_abs_error", "output_rel_error", "output_mse", "output_max_abs_error",
               "output_fisher_error"}
