"""Predicted vs measured: does the probe's per-module score rank modules as the real model does?

The planner ranks modules by a score measured one Linear at a time (by default the relative
output error on calibration data). Here the top-K modules by that score plus a random sample
of the others are each quantized *alone* in the 16-bit model (bitsandbytes' round trip, see
:mod:`analysis.simulate`), and the model's mean KL divergence from 16-bit on held-out text is
measured. The Spearman rank correlation between score and measured KLD says whether the
probe can be trusted on this model: near 1, the planner's ranking is the model's; near 0 or
negative, the plan is no better informed than a guess.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache
from quantplan.planner.objective import scores
from quantplan.planner.plan_types import Plan

from .fidelity import measure_variants

AGREEMENT_COLUMNS = {
    "name": "module quantized alone",
    "selected": "top (highest predicted scores) | random (sample of the rest)",
    "predicted": "the planner's score for this module (its objective)",
    "predicted_rank": "rank among all candidate modules by predicted score (1 = most sensitive)",
    "measured_kld": "mean KL divergence from 16-bit on held-out text with only this module quantized (nats)",
}


def predicted_vs_measured(table, plan: Plan, cache: QuantCache, reference: KLReference, top_k: int = 8,
                          random_k: int = 8, seed: int = 0, progress=None) -> tuple[pd.DataFrame, dict]:
    """Measured KLD for the top-K + random-K modules, and the Spearman correlation with the score."""
    from scipy.stats import spearmanr

    candidates = _candidates(table, plan)
    ranked = candidates.sort_values(ascending=False)
    top = list(ranked.index[:top_k])
    rest = list(ranked.index[top_k:])
    sample = list(np.random.default_rng(seed).choice(rest, size=min(random_k, len(rest)), replace=False)) if rest else []
    rows = []
    measured = measure_variants(reference, cache, {name: [name] for name in top + sample})
    for name in top + sample:
        kld = float(measured[name].kld.mean())
        rows.append({"name": name, "selected": "top" if name in top else "random",
                     "predicted": float(candidates[name]),
                     "predicted_rank": int(ranked.index.get_loc(name)) + 1, "measured_kld": kld})
        if progress:
            progress(name)
    frame = pd.DataFrame(rows, columns=list(AGREEMENT_COLUMNS))
    stats = {"modules": len(frame), "candidates": len(candidates), "objective": plan.objective,
             "tokens": reference.tokens, "spearman": float("nan"), "p_value": float("nan")}
    if len(frame) >= 3 and frame["predicted"].nunique() > 1 and frame["measured_kld"].nunique() > 1:
        result = spearmanr(frame["predicted"], frame["measured_kld"])
        stats.update(spearman=float(result.statistic), p_value=float(result.pvalue))
    stats["verdict"] = verdict(stats)
    return frame, stats


def verdict(stats: dict) -> str:
    """One sentence on whether the probe's ranking can be trusted."""
    rho = stats.get("spearman", float("nan"))
    if not np.isfinite(rho):
        return "not enough distinct measurements to correlate predicted and measured sensitivity"
    n = stats["modules"]
    if rho >= 0.7:
        return f"the probe ranks modules as the model does (Spearman ρ = {rho:.2f} over {n} modules): trust the plan"
    if rho >= 0.4:
        return (f"the probe ranks modules only roughly as the model does (Spearman ρ = {rho:.2f} over {n} "
                f"modules): check the plan against the scoreboard before relying on it")
    return (f"the probe does NOT rank modules as the model does (Spearman ρ = {rho:.2f} over {n} modules): "
            f"do not trust the plan on this model without the measured scoreboard")


def _candidates(table, plan: Plan) -> pd.Series:
    """Predicted score of every module the plan could quantize in its 4-bit format."""
    fmt = plan.tiers[0]
    rows = table.for_format(fmt)
    rows = rows[(rows["kind"] == "Linear") & rows["supported"] & rows["quantizable"] & (rows["group"] != "lm_head")]
    return scores(rows.set_index("name"), plan.objective, table)
