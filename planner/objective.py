"""The planner's objective: how a measured table row becomes an error score to minimise.

- ``output`` (default): the module's relative output error ‖X(W−Ŵ)ᵀ‖²/‖XWᵀ‖² on the
  calibration data: what the module's consumers actually see.
- ``weight``: squared relative weight error ‖W−Ŵ‖²/‖W‖² (no data needed; same units).
- ``combined``: the mean of both, each first divided by its average over the table so
  neither dominates by scale.
- ``fisher``: the Fisher-weighted output error Σ_o mean(∂L/∂y_o)²·Σ_t Δy_o², in next-token
  loss units, so module scores add up to an estimate of the loss increase (needs a table
  analyzed with ``--fisher``).
- ``restore``: the quantized-context score, the first-order decrease of the model's KL
  divergence from 16-bit if the module alone went back to 16-bit in the all-4-bit model
  (``restore_gain``, needs a table analyzed with ``--context``): upstream and downstream
  rounding included.

``auto`` (the default) is ``fisher`` when the table has Fisher scores, else ``output``. On
SmolLM2-135M (held-out text, mean KL vs 16-bit, share of the all-NF4 KL closed at +10 % / +33 %
bytes; ``benchmarks/plan_quality.py``): output error 25 % / 36 %, weight error 24 % / 34 %,
combined 26 % / 35 %, Fisher 43 % / 65 %, restore (quantized context) 45 % / 64 %. Restore is
no better overall and its extra pass doubles the analysis cost (13.6x vs 6.8x a forward), so
``auto`` stays on Fisher; ``restore`` is there when asked for (``--context``).

Modules the calibration data never reached (output error NaN) fall back to their weight
score, so they are still ranked rather than silently treated as harmless.
"""

from __future__ import annotations

import pandas as pd

OBJECTIVES = ("output", "weight", "combined", "fisher", "restore")


def scores(rows: pd.DataFrame, objective: str, table=None) -> pd.Series:
    """Error score per module (index: name) for one format's rows."""
    weight = rows["weight_rel_error"] ** 2
    output = rows["output_rel_error"].fillna(weight)
    if objective == "fisher":
        if "output_fisher_error" not in rows or rows["output_fisher_error"].isna().all():
            raise ValueError("objective 'fisher' needs a table analyzed with --fisher (fisher=True): re-run analyze")
        score = rows["output_fisher_error"].fillna(weight * _mean(rows["output_fisher_error"]) / _mean(weight))
    elif objective == "restore":
        if "restore_gain" not in rows or rows["restore_gain"].isna().all():
            raise ValueError("objective 'restore' needs a table analyzed with --context (context=True): re-run analyze")
        gain = rows["restore_gain"].clip(lower=0.0)
        score = gain.fillna(weight * _mean(gain) / _mean(weight))
    elif objective == "output":
        score = output
    elif objective == "weight":
        score = weight
    else:
        score = 0.5 * (output / _mean(output) + weight / _mean(weight))
    return score.fillna(0.0).clip(lower=0.0)


def _mean(series: pd.Series) -> float:
    value = float(series.mean())
    return value if value > 0 else 1.0
