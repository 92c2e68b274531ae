"""Consecutive blocks of a matrix's rows of about N elements each: how the analysis walks a large tensor.

A weight (an lm_head of 128k words × 4096 is 0.5 G elements) or a batch's activations are read a
block of rows at a time wherever a float32 copy, a product or a comparison of the whole would be a
large temporary: the measurement's round-trip error (:mod:`analysis.measure`), the output-energy
hook's sum of squares (:mod:`analysis.output_energy`) and the packed-weight store's comparison
(:mod:`analysis.packed`). One helper, so the three split a matrix the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def row_chunks(matrix: torch.Tensor, elements: int) -> Iterator[torch.Tensor]:
    """Consecutive blocks of rows of ``matrix`` holding about ``elements`` elements each (at least one row); a
    1-d tensor's rows are its elements, a 0-d tensor is one block of itself."""
    width = matrix[0].numel() if matrix.dim() > 1 and matrix.shape[0] else 1
    step = max(1, elements // max(width, 1))
    for start in range(0, matrix.shape[0] if matrix.dim() else 1, step):
        yield matrix[start:start + step] if matrix.dim() else matrix
