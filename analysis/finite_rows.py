"""The finite rows of a streamed tensor without a per-row check in the common case (every row finite).

The probes skip tokens whose activation or gradient is not finite (counted and flagged, never poisoning the sums).
Checking every row with ``torch.isfinite(rows).all(dim=1)`` costs several passes over the tensor (about four
times a column max) on every Linear of every batch, although rows are almost always finite. A non-finite
entry makes its column's max |x| or sum of squares non-finite, so the reduction each probe takes anyway proves
all rows finite when it is finite; only when it is not are the finite rows picked and the reduction redone over
them, giving the same numbers as picking them first.
"""

from __future__ import annotations

import torch


def finite_rows_absmax(rows: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(the finite rows of ``rows`` [tokens, width], how many were not, their per-column max |x| or None if none)."""
    absmax = rows.abs().amax(dim=0) if len(rows) else None
    if absmax is None or bool(torch.isfinite(absmax).all()):
        return rows, 0, absmax
    finite = torch.isfinite(rows).all(dim=1)
    rows = rows[finite]
    return rows, int((~finite).sum()), rows.abs().amax(dim=0) if len(rows) else None


def finite_squared_sum(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ_t rows[t]² per column over the finite rows of ``rows`` [tokens, width], how many rows that is)."""
    squared = (rows * rows).sum(dim=0)  # a product, not ``pow(2)``: half the time on the CPU
    if bool(torch.isfinite(squared).all()):
        return squared, rows.shape[0]
    rows = rows[torch.isfinite(rows).all(dim=1)]
    return (rows * rows).sum(dim=0), rows.shape[0]
