"""The Gram matrix accumulated as its upper block triangle equals the full Σ xᵀx, however it is read and resumed."""

import json

import pytest
import torch

from quantplan.analysis.gram import add_upper, block_width, clear_lower, mirror_lower
from quantplan.analysis.probe import InputProbe, InputStats


@pytest.mark.parametrize("width", [7, 128, 130, 576, 1000])
def test_upper_triangle_mirrored_is_the_full_gram(width):
    torch.manual_seed(width)
    batches = [torch.randn(rows, width) for rows in (5, 33, 64)]
    gram = torch.zeros(width, width)
    for rows in batches:
        add_upper(gram, rows)
    mirror_lower(gram)
    full = sum(rows.T @ rows for rows in batches)
    torch.testing.assert_close(gram, full, rtol=1e-5, atol=1e-4)


def test_blocks_below_the_diagonal_are_neither_computed_nor_cleared_beyond_them():
    width = 600
    step = block_width(width)
    assert step < width  # several blocks, or the test says nothing
    gram = torch.zeros(width, width)
    add_upper(gram, torch.randn(16, width))
    assert gram[step:, :step].abs().sum() == 0  # below the first diagonal block: untouched
    upper = gram.clone()
    mirror_lower(gram)
    clear_lower(gram)
    assert torch.equal(gram, upper)


def test_stats_read_between_batches_stay_exact():
    """A read (mirror) between batches, then more tokens: the Gram is still Σ xᵀx of every token."""
    torch.manual_seed(0)
    width = 300
    stats = InputStats(torch.zeros(width, width), torch.zeros(width))
    first, second = torch.randn(40, width), torch.randn(24, width)
    stats.update(first, sample_rows=4)
    torch.testing.assert_close(stats.symmetric_gram(), first.T @ first, rtol=1e-5, atol=1e-4)
    stats.update(second, sample_rows=4)
    both = first.T @ first + second.T @ second
    torch.testing.assert_close(stats.symmetric_gram(), both, rtol=1e-5, atol=1e-4)


def test_saved_partial_state_resumes_in_either_form(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(260, 3))
    probe = InputProbe(model, ["0"])
    x = torch.randn(2, 9, 260)
    with probe.attached():
        probe.start_batch()
        model(x)
        probe.commit_batch()
    expected = x.reshape(-1, 260).T @ x.reshape(-1, 260)
    probe.save(tmp_path, {})
    resumed = InputProbe(model, ["0"])
    resumed.load(tmp_path)
    torch.testing.assert_close(resumed.stats_for("0").symmetric_gram(), expected, rtol=1e-5, atol=1e-4)
    # a state written before the triangle (two counts per input, full Gram matrices) reads as mirrored
    state = json.loads((tmp_path / "state.json").read_text())
    mirrored = probe.stats_for("0").symmetric_gram().clone()
    state["counts"] = {owner: counts[:2] for owner, counts in state["counts"].items()}
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / state["tensors"]))
    tensors["0::gram"] = mirrored
    save_file(tensors, str(tmp_path / state["tensors"]))
    (tmp_path / "state.json").write_text(json.dumps(state))
    old = InputProbe(model, ["0"])
    old.load(tmp_path)
    with old.attached():
        old.start_batch()
        model(x)
        old.commit_batch()
    torch.testing.assert_close(old.stats_for("0").symmetric_gram(), 2 * expected, rtol=1e-5, atol=1e-4)


def test_a_gram_made_under_inference_mode_is_read_and_extended_outside_it():
    """The calibration pass without Fisher runs under inference mode; the measurement reads outside it."""
    width = 300
    with torch.inference_mode():
        stats = InputStats(torch.zeros(width, width), torch.zeros(width))
        first = torch.randn(16, width)
        stats.update(first, sample_rows=4)
    torch.testing.assert_close(stats.symmetric_gram(), first.T @ first, rtol=1e-5, atol=1e-4)
    with torch.inference_mode():
        second = torch.randn(8, width)
        stats.update(second, sample_rows=4)
    torch.testing.assert_close(stats.symmetric_gram(), first.T @ first + second.T @ second, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [7, 128, 300, 1100])
def test_quadratic_diag_is_the_full_quadratic_form_from_the_upper_blocks_only(width):
    """diag(M G Mᵀ) over the upper block triangle equals the float64 full form, whatever lies below the diagonal."""
    from quantplan.analysis.gram import quadratic_diag

    torch.manual_seed(width)
    x = torch.randn(400, width) + 2.0 * torch.randn(400, 1)  # a strong common direction: cross terms matter
    m = torch.randn(50, width)
    gram = torch.zeros(width, width)
    add_upper(gram, x)
    expected = ((m.double() @ (x.double().T @ x.double())) * m.double()).sum(dim=1)
    step = block_width(width)
    gram[step:, :step] = float("nan")  # below the diagonal blocks: never read
    torch.testing.assert_close(quadratic_diag(m, gram), expected, rtol=2e-5, atol=0)
    assert float(quadratic_diag(m, gram).sum()) == pytest.approx(float(expected.sum()), rel=1e-6)
