"""Σ xᵀx kept as its column blocks on and above the diagonal: half the multiply-adds and about half the memory.

The Gram matrix of a Linear's inputs is symmetric, yet a full ``G.addmm_(xᵀ, x)`` computes every entry
twice; it costs as many multiply-adds per token as the Linears that read the input, which made the
calibration pass several forward passes long (benchmarks/README.md, probe_cost.py). BLAS has a symmetric
rank-k update (SYRK) that computes one triangle, but torch does not expose it; the same saving comes from
splitting the columns into blocks and multiplying only the blocks on and above the diagonal: with 8 blocks,
36 of the 64 block products (56 %). :class:`UpperGram` stores only those blocks, one column strip per block
(rows 0..end of the block's columns) in one flat float32 buffer: the blocks below the diagonal are never
allocated. On SmolLM2-135M the statistics the calibration pass holds went from 0.37 to 0.22 GiB.
The block boundaries depend on the width alone, so batches, resumed runs and distributed ranks all add into
the same layout (a distributed reduce sums the flat buffers). The measurement's quadratic forms diag(M·G·Mᵀ)
read the same blocks (:func:`quadratic_diag`); :meth:`UpperGram.full` builds the symmetric matrix where one
is needed whole (tests, tools).

The products: bf16 activations on hardware that multiplies bf16 natively (a GPU, a CPU with AVX512-BF16/AMX:
:func:`product_dtype`) are multiplied in bf16, whose products are exact and summed in float32 inside the matmul;
each batch's block product is rounded once to bf16 (relative 2⁻⁹ per entry) and added into the float32 strips.
On SmolLM2-135M in bf16 (8192 tokens, AVX512-BF16 CPU) that took 17 % off the Fisher analysis' CPU time; every
Fisher and output-error score stayed within 0.035 % of the float32 products' and the plans at +10 % and +33 %
were the same (benchmarks/README.md, probe_cost.py); on a single batch of 512 tokens a module's output error moved
by up to 0.13 % (tests/test_smollm2.py). float32 activations (``--dtype fp32``, the default on CPUs
without native bf16) keep float32 products.
"""

from __future__ import annotations

import torch

from .models import computes_bf16

#: the narrowest block: below it the smaller products lose more to overhead than they save
MIN_BLOCK = 128
#: at most this many column blocks (their count sets the share: (k + 1) / 2k of the full product)
MAX_BLOCKS = 8


def block_width(width: int) -> int:
    """Columns per block for a Gram matrix of ``width`` inputs (the whole width when it is narrow)."""
    return max(MIN_BLOCK, -(-width // MAX_BLOCKS))


def column_blocks(width: int) -> list[tuple[int, int]]:
    """(start, end) of each column block of a ``width``-wide Gram matrix."""
    step = block_width(width)
    return [(start, min(start + step, width)) for start in range(0, width, step)]


def upper_elements(width: int) -> int:
    """Floats an :class:`UpperGram` of ``width`` inputs stores: its column blocks on and above the diagonal."""
    return sum(end * (end - start) for start, end in column_blocks(width))


class UpperGram:
    """Σ xᵀx of one input width, stored as the column strips ``G[:end, start:end]`` of its blocks.

    ``data`` is the flat float32 buffer (what is saved, resumed and reduced across processes); the strips are
    views into it, column block after column block, each row-major. A buffer made under ``torch.inference_mode``
    is added to under it (as every pass that makes one does); it can be read anywhere.
    """

    def __init__(self, data: torch.Tensor, width: int):
        if data.dim() != 1 or data.numel() != upper_elements(width) or data.dtype != torch.float32:
            raise ValueError(damaged(f"an upper-block Gram matrix of width {width} holds {upper_elements(width)} "
                                     f"float32 values, got a {data.dtype} tensor of shape {tuple(data.shape)}"))
        self.data = data
        self.width = width

    @classmethod
    def zeros(cls, width: int, device=None) -> UpperGram:
        """An empty Gram matrix (no tokens yet)."""
        return cls(torch.zeros(upper_elements(width), dtype=torch.float32, device=device), width)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, width: int) -> UpperGram:
        """The upper blocks of a ``[width, width]`` float32 matrix: a full Gram matrix, or one whose blocks below
        the diagonal were never filled (partial states written before the blocks were stored apart)."""
        if tuple(matrix.shape) != (width, width) or matrix.dtype != torch.float32:
            raise ValueError(damaged(f"a Gram matrix of width {width} is a [{width}, {width}] float32 matrix, got "
                                     f"a {matrix.dtype} tensor of shape {tuple(matrix.shape)}"))
        gram = cls.zeros(width, matrix.device)
        for (start, end), strip in zip(column_blocks(width), gram.strips(), strict=True):
            strip.copy_(matrix[:end, start:end])
        return gram

    def strips(self) -> list[torch.Tensor]:
        """One ``[end, end - start]`` view per column block, in block order."""
        views, offset = [], 0
        for start, end in column_blocks(self.width):
            size = end * (end - start)
            views.append(self.data[offset:offset + size].view(end, end - start))
            offset += size
        return views

    def add(self, rows: torch.Tensor, product: torch.dtype = torch.float32) -> None:
        """``G += rowsᵀ rows`` (``rows``: [tokens, width]) on the stored blocks only, the block products in
        ``product`` (:func:`product_dtype`: float32, or bf16 for rows that are bf16 values)."""
        if product == torch.float32:
            for (start, end), strip in zip(column_blocks(self.width), self.strips(), strict=True):
                strip.addmm_(rows[:, :end].T, rows[:, start:end])
            return
        low = rows.to(product)
        for (start, end), strip in zip(column_blocks(self.width), self.strips(), strict=True):
            strip.add_(low[:, :end].T @ low[:, start:end])

    def to(self, device) -> UpperGram:
        """This Gram matrix on ``device`` (itself when it is there already)."""
        moved = self.data.to(device)
        return self if moved is self.data else UpperGram(moved, self.width)

    def rounded(self, dtype: torch.dtype) -> UpperGram:
        """This Gram matrix with its entries rounded once to ``dtype`` (the measurement's bf16 products,
        :func:`quadratic_diag`: a copy of half its bytes, made once per module and format rather than per row chunk);
        itself when already in ``dtype``. The copy is for reading only (never saved, resumed or added to)."""
        if dtype == self.data.dtype:
            return self
        copy = object.__new__(UpperGram)
        copy.data, copy.width = self.data.to(dtype), self.width
        return copy

    def full(self) -> torch.Tensor:
        """The symmetric ``[width, width]`` matrix (a new tensor: width² floats)."""
        out = torch.empty(self.width, self.width, dtype=self.data.dtype, device=self.data.device)
        for (start, end), strip in zip(column_blocks(self.width), self.strips(), strict=True):
            out[:end, start:end] = strip
            out[start:end, :start] = strip[:start].T
        return out


def product_dtype(activations: torch.Tensor) -> torch.dtype:
    """The dtype a Gram update multiplies ``activations`` in, and the measurement's quadratic forms a weight's errors
    (:func:`quadratic_diag`): bf16 for bf16 values on a device that multiplies bf16 natively (exact products, float32
    sums inside the matmul, one bf16 rounding per batch or per operand: module docstring), else float32. fp16 stays
    float32: a batch's sums of squares overflow its range."""
    if activations.dtype != torch.bfloat16 or not computes_bf16(activations.device):
        return torch.float32
    return torch.bfloat16


def damaged(what: str) -> str:
    """The error for saved statistics that cannot be what the analysis wrote, naming the fix."""
    return f"{what}: the saved partial statistics are damaged; run without --resume to start afresh"


def quadratic_diag(m: torch.Tensor, gram: UpperGram, product: torch.dtype = torch.float32) -> torch.Tensor:
    """diag(M·G·Mᵀ) in float64 (each row of ``m``'s summed squared response) from the stored blocks of ``gram``,
    at about half the multiply-adds of ``(M @ G) * M``.

    By symmetry the product of M's block i, G's block (i, j) and M's block j equals that of blocks j, (j, i),
    i: each block column j adds ``M_j ∘ (M_j G_jj + 2 Σ_{i<j} M_i G_ij)``. The sums within a block are float32, the
    blocks add up in float64. ``product`` is the dtype of the matmuls (:func:`product_dtype` of the weight):
    - float32: on SmolLM2's Linears (4096 tokens) the module totals stay within 2e-7 of the float64 form;
    - bf16 (a bf16 weight on bf16 hardware): M and G are rounded to bf16 once, their products are exact and summed in
      float32 inside the matmul. On SmolLM2's 210 Linears in bf16 (2048 tokens, AVX512-BF16 CPU, 1 thread) the
      measurement's quadratic forms took 0.89 s instead of 2.28 s for two formats; the module totals moved by 1.7e-4
      (median; 95th percentile 1.5e-3, max 2.5e-3) and a module's blocksize-64 minus blocksize-32 error by 4.7e-4
      (median; max 7.2e-3): ten times below the sampled Fisher labels' own spread (benchmarks/README.md). Measured on
      a CPU; on a GPU, cuBLAS may also reduce in bf16 (torch's ``allow_bf16_reduced_precision_reduction``), as in
      the Gram updates.
    A ``gram`` on another device or in another dtype than the products is copied per call: callers with many row
    chunks move it once first (:meth:`UpperGram.to`) and round it once (:meth:`UpperGram.rounded`).
    """
    if m.shape[-1] != gram.width:
        raise ValueError(f"a [{m.shape[0]}, {m.shape[-1]}] matrix has no quadratic form with a Gram matrix of "
                         f"width {gram.width}")
    gram = gram.to(m.device)
    low = m.to(product)
    out = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
    for (start, end), strip in zip(column_blocks(gram.width), gram.strips(), strict=True):
        strip = strip.to(product)
        block = low[:, start:end]
        if product == torch.float32:
            response = block @ strip[start:end]
            if start:
                response.addmm_(low[:, :start], strip[:start], alpha=2)
        else:  # bf16 results rounded once each, added in float32
            response = (block @ strip[start:end]).float()
            if start:
                response.add_((low[:, :start] @ strip[:start]).float(), alpha=2)
        out += response.mul_(block).sum(dim=1)  # float32 within a block, float64 across blocks
    return out
