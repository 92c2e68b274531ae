"""Σ xᵀx accumulated as its upper block triangle: the Gram matrix at about half the multiply-adds.

The Gram matrix of a Linear's inputs is symmetric, yet a full ``G.addmm_(xᵀ, x)`` computes every entry
twice; it costs as many multiply-adds per token as the Linears that read the input, which made the
calibration pass several forward passes long (benchmarks/README.md, probe_cost.py). BLAS has a symmetric
rank-k update (SYRK) that computes one triangle, but torch does not expose it; the same saving comes from
splitting the columns into blocks and multiplying only the blocks on and above the diagonal: with 8 blocks,
36 of the 64 block products (56 %). :func:`add_upper` accumulates that way; the blocks below the diagonal stay
untouched until :func:`mirror_lower` copies the transposed upper blocks into them, once, before the Gram
matrix is read. The block boundaries depend on the width alone, so batches, resumed runs and distributed
ranks all add into the same blocks. The measurement's quadratic forms diag(M·G·Mᵀ) take the same saving
from the same blocks (:func:`quadratic_diag`).
"""

from __future__ import annotations

import torch

#: the narrowest block: below it the smaller products lose more to overhead than they save
MIN_BLOCK = 128
#: at most this many column blocks (their count sets the share: (k + 1) / 2k of the full product)
MAX_BLOCKS = 8


def block_width(width: int) -> int:
    """Columns per block for a Gram matrix of ``width`` inputs (the whole width when it is narrow)."""
    return max(MIN_BLOCK, -(-width // MAX_BLOCKS))


def add_upper(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """``gram += rowsᵀ rows`` on the diagonal blocks and above them only (``rows``: [tokens, width])."""
    width = rows.shape[1]
    step = block_width(width)
    for start in range(0, width, step):
        gram[start:start + step, start:].addmm_(rows[:, start:start + step].T, rows[:, start:])


def mirror_lower(gram: torch.Tensor) -> None:
    """Fill the blocks below the diagonal from the transposed blocks above it: ``gram`` becomes the full
    symmetric Gram matrix (in place, one block at a time, no width² temporary)."""
    width = gram.shape[0]
    step = block_width(width)
    with torch.inference_mode(gram.is_inference()):  # a Gram made under inference mode is updated under it
        for start in range(0, width - step, step):
            end = start + step
            gram[end:, start:end].copy_(gram[start:end, end:].T)


def clear_lower(gram: torch.Tensor) -> None:
    """Zero the blocks below the diagonal (a mirrored Gram matrix back to the form :func:`add_upper` adds to)."""
    width = gram.shape[0]
    step = block_width(width)
    with torch.inference_mode(gram.is_inference()):
        for start in range(0, width - step, step):
            gram[start + step:, start:start + step].zero_()


def quadratic_diag(m: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """diag(M·G·Mᵀ) in float64 (each row of ``m``'s summed squared response) from the blocks of the symmetric
    ``gram`` on and above the diagonal only, at about half the multiply-adds of ``(M @ G) * M``.

    By symmetry the product of M's block i, G's block (i, j) and M's block j equals that of blocks j, (j, i),
    i: each block column j adds ``M_j ∘ (M_j G_jj + 2 Σ_{i<j} M_i G_ij)``. The products run in ``m``'s dtype
    (float32), so do the sums within a block; the blocks add up in float64. On SmolLM2's Linears (4096 tokens) the
    module totals stay within 2e-7 of the float64 form, as close as the full float32 product came.
    """
    width = gram.shape[0]
    step = block_width(width)
    out = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
    for start in range(0, width, step):
        end = min(start + step, width)
        block = m[:, start:end]
        response = block @ gram[start:end, start:end]
        if start:
            response.addmm_(m[:, :start], gram[:start, start:end], alpha=2)
        out += response.mul_(block).sum(dim=1)  # float32 within a block, float64 across blocks
    return out
