"""measure_module's error columns equal a plain float64 computation from the same bitsandbytes round trip.

The measurement computes its sums in row chunks, over the Gram matrix's upper block triangle, in float32 with
float64 totals (analysis/measure.py, analysis/gram.py); this is the definition it must keep, column by column.
"""

import math

import pytest
import torch

from quantplan.analysis.formats import NF4, NF4_BS32
from quantplan.analysis.measure import measure_module
from quantplan.analysis.modules import ModuleInfo
from quantplan.analysis.probe import InputStats


def _reference_row(weight, x, sample, fmt, grad_sq) -> dict:
    """Every error column of ``fmt`` for ``weight`` and inputs ``x``, straight from the definitions in float64."""
    restored, _ = fmt.roundtrip(weight)
    w, delta = weight.double(), weight.double() - restored.double()
    gram = x.double().T @ x.double()
    per_output = ((delta @ gram) * delta).sum(dim=1)
    error = float(per_output.sum())
    centered = w - w.mean()
    var = float(centered.pow(2).mean())
    return {
        "weight_rel_error": float(delta.norm() / w.norm()),
        "weight_max_abs_error": float(delta.abs().max()),
        "output_rel_error": error / float(((w @ gram) * w).sum()),
        "output_mse": error / (x.shape[0] * weight.shape[0]),
        "output_max_abs_error": float((sample.double() @ delta.T).abs().max()) if sample is not None else math.nan,
        "output_fisher_error": float((per_output * grad_sq.double()).sum()) if grad_sq is not None else math.nan,
        "weight_absmax_over_std": float(w.abs().max()) / math.sqrt(var),
        "weight_kurtosis": float(centered.pow(4).mean()) / var ** 2,
    }


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("with_sample", [False, True])
@pytest.mark.parametrize("shape", [(96, 320), (40, 64)])  # several Gram blocks (128 wide) / one block
def test_columns_equal_the_float64_definitions(shape, fisher, with_sample):
    out_features, in_features = shape
    torch.manual_seed(out_features + in_features)
    weight = torch.randn(shape) * 0.02 + 0.001
    # correlated inputs with a large common direction and one outlier channel, as real activations have
    x = torch.randn(200, in_features) + 3.0 * torch.randn(200, 1)
    x[:, 5] *= 30
    stats = InputStats.empty(in_features)
    stats.update(x, sample_rows=32)
    if not with_sample:
        stats.sample = None
    grad_sq = torch.rand(out_features) if fisher else None
    info = ModuleInfo("layer.proj", "mlp", 0, "proj", "Linear", out_features, in_features, True)
    rows = measure_module(info, weight, stats, [NF4, NF4_BS32], None, grad_sq)
    assert [r["format"] for r in rows] == ["nf4", "nf4-bs32"] and all(r["supported"] for r in rows)
    for row, fmt in zip(rows, [NF4, NF4_BS32], strict=True):
        expected = _reference_row(weight, x, stats.sample, fmt, grad_sq)
        for column, value in expected.items():
            if math.isnan(value):
                assert math.isnan(row[column]), column
            else:
                assert row[column] == pytest.approx(value, rel=2e-6), (fmt.name, column)


def test_blocksize_64_reference_is_measured_first_and_never_twice(monkeypatch):
    """A menu listing nf4-bs32 before nf4: one round trip per format (the guard reuses nf4's), rows in menu order."""
    from quantplan.analysis.formats import FourBit

    calls = []
    original = FourBit.roundtrip
    monkeypatch.setattr(FourBit, "roundtrip", lambda self, w: calls.append(self.name) or original(self, w))
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    info = ModuleInfo("layer.proj", "mlp", 0, "proj", "Linear", 32, 128, True)
    rows = measure_module(info, weight, None, [NF4_BS32, NF4], None)
    assert calls == ["nf4", "nf4-bs32"]
    assert [r["format"] for r in rows] == ["nf4-bs32", "nf4"]
    alone = measure_module(info, weight, None, [NF4_BS32], None)  # the guard's own reference round trip
    assert alone[0]["weight_rel_error"] == rows[0]["weight_rel_error"]
