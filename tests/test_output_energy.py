"""The reference energy ‖XWᵀ‖² summed from the Linears' outputs (analysis/output_energy.py) vs its quadratic form."""

from __future__ import annotations

import importlib
import math

import pandas as pd
import pytest
import torch
from tiny import random_calibration, tiny_llama

from quantplan.analysis import NF4, analyze
from quantplan.analysis.gram import UpperGram
from quantplan.analysis.output_energy import OutputEnergy, _finite_energy
from quantplan.analysis.probe import InputStats

measure = importlib.import_module("quantplan.analysis.measure")


def _counting_quadratic_form(monkeypatch) -> list[int]:
    calls = []
    quadratic = measure._output_energy

    def counting(weight, stats):
        calls.append(1)
        return quadratic(weight, stats)

    monkeypatch.setattr(measure, "_output_energy", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fisher", [False, True])
def test_summed_energy_gives_the_quadratic_form_table(monkeypatch, dtype, fisher):
    """Every column equal within float tolerance, and no quadratic reference form computed for bias-free Linears."""
    model = tiny_llama(layers=2).to(dtype)
    calibration = random_calibration(samples=6)
    calls = _counting_quadratic_form(monkeypatch)
    summed = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=fisher)
    assert len(calls) == 1  # lm_head's, as the streamed analysis (which makes no logits in its head stage)
    monkeypatch.setattr(OutputEnergy, "reference", lambda self, name, stats: None)
    quadratic = analyze(model, calibration, [NF4], batch_size=4, progress=False, fisher=fisher)
    assert len(calls) == 1 + 15  # 7 Linears a layer and lm_head
    pd.testing.assert_frame_equal(summed.df, quadratic.df, rtol=1e-5 if dtype == torch.float32 else 1e-3)


def test_nonfinite_tokens_are_left_out_as_in_the_gram_matrix(monkeypatch):
    """NaN rows in a Linear's input: the sum covers the finite rows, the same tokens as the Gram matrix."""
    model = tiny_llama(layers=2).float()

    def poison(module, args, output):
        output = output.clone()
        output[0, 3, :] = float("nan")
        return output

    model.model.layers[1].self_attn.o_proj.register_forward_hook(poison)
    calibration = random_calibration(samples=4)
    summed = analyze(model, calibration, [NF4], progress=False)
    monkeypatch.setattr(OutputEnergy, "reference", lambda self, name, stats: None)
    quadratic = analyze(model, calibration, [NF4], progress=False)
    rows = summed.for_format("nf4").set_index("name")
    assert rows.loc["model.layers.1.mlp.gate_proj", "nonfinite_tokens"] > 0
    assert rows[rows["quantizable"]]["output_rel_error"].notna().all()
    pd.testing.assert_frame_equal(summed.df, quadratic.df, rtol=1e-5)


def test_finite_energy_counts_finite_input_rows_and_refuses_overflow():
    x = torch.randn(5, 8)
    weight = torch.randn(3, 8)
    x[2, 1] = float("inf")
    energy, count = _finite_energy(x, x @ weight.T)
    keep = torch.tensor([True, True, False, True, True])
    assert count == 4 and energy == pytest.approx(float((x[keep] @ weight.T).pow(2).sum()), rel=1e-6)
    y = torch.ones(2, 3)
    y[0, 0] = float("inf")  # a finite input whose output overflowed: only the quadratic form can say
    energy, count = _finite_energy(torch.ones(2, 4), y)
    assert math.isnan(energy)


def test_quadratic_form_where_the_sum_cannot_stand_in():
    """A Linear with a bias is not hooked; another token count than the Gram matrix's (a partial state saved before
    the sums existed) or an overflow gives None: the measurement computes the quadratic form."""
    model = tiny_llama(layers=1).float()
    attention = model.model.layers[0].self_attn
    attention.q_proj.bias = torch.nn.Parameter(torch.zeros(attention.q_proj.out_features))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    energy = OutputEnergy(model, names)
    with energy.attached(), torch.inference_mode():
        energy.start_batch()
        model(torch.tensor([[5, 6, 7, 8]]))
        energy.commit_batch()
    assert set(energy.sums) == {names[1]} and energy.tokens[names[1]] == 4
    stats = InputStats(UpperGram.zeros(64), torch.zeros(64), tokens=4)
    assert energy.reference(names[1], stats) == energy.sums[names[1]]
    assert energy.reference(names[0], stats) is None
    assert energy.reference(names[1], InputStats(UpperGram.zeros(64), torch.zeros(64), tokens=8)) is None
    energy.sums[names[1]] = math.nan
    assert energy.reference(names[1], stats) is None
    restored = OutputEnergy(model, names)
    restored.load_state({**energy.state(), "other::gradsq": torch.zeros(3)})
    assert restored.tokens == energy.tokens and math.isnan(restored.sums[names[1]])


@pytest.mark.parametrize("shape", [(4, 257, 1536), (3, 1030, 576), (1000,)])
def test_squared_sum_over_row_chunks_is_the_whole_sum(monkeypatch, shape):
    """Σ y² over row chunks (no whole-batch float32 copy) is the float64 sum to 1e-6, whatever the chunk size."""
    from quantplan.analysis import output_energy

    y = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = float((y.double() ** 2).sum())
    assert output_energy._squared_sum(y) == pytest.approx(exact, rel=1e-6)
    monkeypatch.setattr(output_energy, "SQUARE_CHUNK_ELEMENTS", 1000)  # many chunks, a remainder in the last
    assert output_energy._squared_sum(y) == pytest.approx(exact, rel=1e-6)
