"""The Gram matrix kept as its upper column blocks equals the full Σ xᵀx, however it is read and resumed."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantplan.analysis.gram import (
    UpperGram,
    block_width,
    column_blocks,
    product_dtype,
    quadratic_diag,
    upper_elements,
)
from quantplan.analysis.probe import InputProbe, InputStats


@pytest.mark.parametrize("width", [7, 128, 130, 576, 1000])
def test_upper_blocks_are_the_full_gram(width):
    torch.manual_seed(width)
    batches = [torch.randn(rows, width) for rows in (5, 33, 64)]
    gram = UpperGram.zeros(width)
    for rows in batches:
        gram.add(rows)
    full = sum(rows.T @ rows for rows in batches)
    torch.testing.assert_close(gram.full(), full, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [7, 576, 1536])
def test_only_the_blocks_on_and_above_the_diagonal_are_stored(width):
    """The buffer holds k(k+1)/2 of k² blocks: about half the full matrix once there are several blocks."""
    blocks = column_blocks(width)
    assert blocks[0][0] == 0 and blocks[-1][1] == width and len(blocks) == -(-width // block_width(width))
    gram = UpperGram.zeros(width)
    assert gram.data.numel() == upper_elements(width) == sum(end * (end - start) for start, end in blocks)
    if len(blocks) == 1:
        assert upper_elements(width) == width * width
    else:
        assert upper_elements(width) < 0.62 * width * width  # 576: 5 blocks, 60.5 %; 1536: 8 blocks, 56 %
    assert sum(s.numel() for s in gram.strips()) == gram.data.numel()
    storage = gram.data.untyped_storage().data_ptr()
    assert all(s.untyped_storage().data_ptr() == storage for s in gram.strips())  # views, no copies


@pytest.mark.parametrize("width", [7, 260, 1100])
def test_the_saved_layout_is_the_column_strips_in_block_order(width):
    """Saved states and distributed ranks rely on this order: column block after column block, row-major."""
    torch.manual_seed(width)
    x = torch.randn(50, width)
    gram = UpperGram.zeros(width)
    gram.add(x)
    full = x.T @ x
    expected = torch.cat([full[:end, start:end].flatten() for start, end in column_blocks(width)])
    torch.testing.assert_close(gram.data, expected, rtol=1e-5, atol=1e-4)


def test_a_matrix_of_the_wrong_size_is_refused_with_the_fix():
    for bad in (lambda: UpperGram(torch.zeros(10), 7), lambda: UpperGram(torch.zeros(49, dtype=torch.float64), 7),
                lambda: UpperGram.from_matrix(torch.zeros(9, 9), 10), lambda: UpperGram.from_matrix(torch.zeros(10, 9), 10)):
        with pytest.raises(ValueError, match="without --resume"):
            bad()
    with pytest.raises(ValueError, match="width 7"):
        quadratic_diag(torch.ones(2, 8), UpperGram.zeros(7))


def test_stats_read_between_batches_stay_exact():
    """A read between batches, then more tokens: the Gram is still Σ xᵀx of every token."""
    torch.manual_seed(0)
    width = 300
    stats = InputStats.empty(width)
    first, second = torch.randn(40, width), torch.randn(24, width)
    stats.update(first, sample_rows=4)
    torch.testing.assert_close(stats.gram.full(), first.T @ first, rtol=1e-5, atol=1e-4)
    stats.update(second, sample_rows=4)
    both = first.T @ first + second.T @ second
    torch.testing.assert_close(stats.gram.full(), both, rtol=1e-5, atol=1e-4)


def _probe_one_batch(model, x) -> InputProbe:
    probe = InputProbe(model, ["0"])
    with probe.attached():
        probe.start_batch()
        model(x)
        probe.commit_batch()
    return probe


def test_saved_partial_state_resumes_in_every_form(tmp_path):
    """The flat blocks resume; so do states written before (a [width, width] matrix, full or upper blocks only)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(260, 3))
    x = torch.randn(2, 9, 260)
    probe = _probe_one_batch(model, x)
    expected = x.reshape(-1, 260).T @ x.reshape(-1, 260)
    probe.save(tmp_path, {})
    state = json.loads((tmp_path / "state.json").read_text())
    assert load_file(str(tmp_path / state["tensors"]))["0::gram"].shape == (upper_elements(260),)
    resumed = InputProbe(model, ["0"])
    resumed.load(tmp_path)
    torch.testing.assert_close(resumed.stats_for("0").gram.full(), expected, rtol=1e-5, atol=1e-4)
    full = probe.stats_for("0").gram.full()
    upper_only = torch.full_like(full, float("nan"))  # the triangle form: blocks below the diagonal never filled
    for start, end in column_blocks(260):
        upper_only[:end, start:end] = full[:end, start:end]
    for old_gram, counts in ((full, 2), (upper_only, 3)):  # full matrices had two counts, the triangle three
        tensors = load_file(str(tmp_path / state["tensors"]))
        tensors["0::gram"] = old_gram
        save_file(tensors, str(tmp_path / state["tensors"]))
        old_state = {**state, "counts": {o: [*c[:2], False][:counts] for o, c in state["counts"].items()}}
        (tmp_path / "state.json").write_text(json.dumps(old_state))
        old = InputProbe(model, ["0"])
        old.load(tmp_path)
        with old.attached():
            old.start_batch()
            model(x)
            old.commit_batch()
        torch.testing.assert_close(old.stats_for("0").gram.full(), 2 * expected, rtol=1e-5, atol=1e-4)


def test_damaged_saved_statistics_name_the_fix(tmp_path):
    """A Gram of the wrong size (flat or square) or a missing tensor: one error saying to start afresh."""
    model = torch.nn.Sequential(torch.nn.Linear(260, 3))
    _probe_one_batch(model, torch.randn(2, 9, 260)).save(tmp_path, {})
    state = json.loads((tmp_path / "state.json").read_text())
    good = load_file(str(tmp_path / state["tensors"]))
    for damage in ({"0::gram": torch.zeros(9, 9)}, {"0::gram": torch.zeros(upper_elements(260) - 1)},
                   {"0::gram": None}):
        tensors = {k: v for k, v in {**good, **damage}.items() if v is not None}
        save_file(tensors, str(tmp_path / state["tensors"]))
        with pytest.raises(ValueError, match="without --resume to start afresh"):
            InputProbe(model, ["0"]).load(tmp_path)


def test_a_gram_made_under_inference_mode_is_read_and_extended_outside_it():
    """The calibration pass without Fisher runs under inference mode; the measurement reads outside it."""
    width = 300
    with torch.inference_mode():
        stats = InputStats.empty(width)
        first = torch.randn(16, width)
        stats.update(first, sample_rows=4)
    torch.testing.assert_close(stats.gram.full(), first.T @ first, rtol=1e-5, atol=1e-4)
    assert float(quadratic_diag(torch.ones(2, width), stats.gram).sum()) > 0
    with torch.inference_mode():
        second = torch.randn(8, width)
        stats.update(second, sample_rows=4)
    torch.testing.assert_close(stats.gram.full(), first.T @ first + second.T @ second, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [7, 128, 300, 1100])
def test_quadratic_diag_is_the_full_quadratic_form_from_the_upper_blocks(width):
    """diag(M G Mᵀ) over the stored blocks equals the float64 full form."""
    torch.manual_seed(width)
    x = torch.randn(400, width) + 2.0 * torch.randn(400, 1)  # a strong common direction: cross terms matter
    m = torch.randn(50, width)
    gram = UpperGram.zeros(width)
    gram.add(x)
    expected = ((m.double() @ (x.double().T @ x.double())) * m.double()).sum(dim=1)
    torch.testing.assert_close(quadratic_diag(m, gram), expected, rtol=2e-5, atol=0)
    assert float(quadratic_diag(m, gram).sum()) == pytest.approx(float(expected.sum()), rel=1e-6)


@pytest.mark.parametrize("width", [7, 300, 1100])
def test_quadratic_diag_in_bf16_is_the_form_of_its_rounded_operands(width):
    """bf16 products (a bf16 weight on bf16 hardware): each row within three bf16 roundings of Σ|m||G||m| of the
    float64 form, the total within 1e-2; and the products did run in bf16 (not the float32 result)."""
    torch.manual_seed(width)
    x = torch.randn(400, width) + 2.0 * torch.randn(400, 1)
    m = torch.randn(50, width) * 1e-3  # weight errors are small
    gram = UpperGram.zeros(width)
    gram.add(x)
    g = gram.full().double()
    expected = ((m.double() @ g) * m.double()).sum(dim=1)
    bound = 3 * 2.0 ** -8 * ((m.double().abs() @ g.abs()) * m.double().abs()).sum(dim=1)
    low = quadratic_diag(m, gram, torch.bfloat16)
    assert low.dtype == torch.float64
    assert ((low - expected).abs() <= bound).all()
    assert float(low.sum()) == pytest.approx(float(expected.sum()), rel=1e-2)
    assert not torch.equal(low, quadratic_diag(m, gram))


@pytest.mark.parametrize("width", [7, 576, 1100])
def test_bf16_products_round_each_batch_once(width):
    """bf16 rows multiplied in bf16: every stored entry within one bf16 rounding per batch of the exact sum."""
    torch.manual_seed(width)
    batches = [torch.randn(rows, width).bfloat16().float() for rows in (5, 300, 64)]  # bf16 values
    gram = UpperGram.zeros(width)
    for rows in batches:
        gram.add(rows, torch.bfloat16)
    exact = sum(rows.double().T @ rows.double() for rows in batches)
    per_batch = sum((rows.double().T @ rows.double()).abs() for rows in batches)
    error = (gram.full().double() - exact).abs()
    assert (error <= per_batch * 2.0**-8 + 1e-6).all()  # 2⁻⁹ per rounding, a factor 2 for the float32 sums
    assert error.max() > 0  # the bf16 path ran (float32 products of these rows are far closer)


def test_bf16_products_only_for_bf16_activations_on_native_hardware(monkeypatch):
    models = importlib.import_module("quantplan.analysis.models")
    x = torch.ones(2, 3)
    assert product_dtype(x) == product_dtype(x.half()) == torch.float32  # fp16 sums of squares would overflow
    monkeypatch.setattr(models, "_cpu_computes_bf16", lambda: True)
    assert product_dtype(x.bfloat16()) == torch.bfloat16
    monkeypatch.setattr(models, "_cpu_computes_bf16", lambda: False)  # AVX2: bf16 matmuls are emulated, slower
    assert product_dtype(x.bfloat16()) == torch.float32


def test_the_probe_of_a_bf16_model_multiplies_as_the_hardware_allows(monkeypatch):
    """The same statistics (within bf16 rounding) whichever product the hardware gets."""
    models = importlib.import_module("quantplan.analysis.models")
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(160, 32)).bfloat16()
    inputs = [torch.randn(4, 50, 160).bfloat16() for _ in range(3)]
    grams = {}
    for native in (True, False):
        monkeypatch.setattr(models, "_cpu_computes_bf16", lambda native=native: native)
        probe = InputProbe(layer, ["0"])
        with probe.attached(), torch.inference_mode():
            for x in inputs:
                probe.start_batch()
                layer(x)
                probe.commit_batch()
        grams[native] = probe.stats_for("0").gram.full()
    scale = float(grams[False].abs().max())  # per-entry bf16 rounding of each batch's products: relative to their size
    torch.testing.assert_close(grams[True], grams[False], rtol=2.0**-7, atol=2.0**-7 * scale)
    assert not torch.equal(grams[True], grams[False])
