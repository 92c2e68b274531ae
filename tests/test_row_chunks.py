"""analysis.row_chunks: blocks of rows of about N elements, together the whole tensor in order."""

import pytest
import torch

from quantplan.analysis.row_chunks import row_chunks


@pytest.mark.parametrize("shape, elements", [((10, 7), 20), ((10, 7), 3), ((10, 7), 1000), ((5,), 2), ((0, 3), 4),
                                             ((4, 3, 2), 12)])
def test_row_chunks_cover_the_tensor_in_order_within_the_size(shape, elements):
    matrix = torch.arange(torch.Size(shape).numel()).reshape(shape)
    chunks = list(row_chunks(matrix, elements))
    row = matrix[0].numel() if len(matrix) and matrix.dim() > 1 else 1
    assert all(c.numel() <= max(elements - elements % row, row) for c in chunks)  # whole rows, at least one
    assert all(len(c) for c in chunks)
    assert torch.equal(torch.cat(chunks) if chunks else matrix, matrix)


def test_a_scalar_is_one_chunk():
    assert [c.item() for c in row_chunks(torch.tensor(3.0), 8)] == [3.0]
