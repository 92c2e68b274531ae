"""The whole trade-off: exact plans at evenly spaced budgets from all-4-bit to all-16-bit."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .budget import BudgetError
from .config import PlanConfig
from .plan_types import KEEP


def pareto_curve(table, points: int = 21, config: PlanConfig | None = None) -> pd.DataFrame:
    """One exact plan per budget step; columns: budget_bytes, bytes, footprint_bytes, error, kept, over_all_4bit,
    and with a blocksize menu one ``in:<tier>`` count per further tier (modules planned in it)."""
    config = (config or PlanConfig()).weights_only()  # the sweep is over the weights' bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        widest = config.plan(table, 2**62)
    low, high = widest.predicted.bytes_all_4bit, widest.predicted.bytes_16bit
    rows = []
    for budget in np.linspace(low, high, points).astype(np.int64):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = config.plan(table, int(budget))
        except BudgetError:
            continue  # below the floor that pins impose
        rows.append({
            "budget_bytes": int(budget),
            "bytes": p.predicted.bytes,
            "footprint_bytes": p.predicted.footprint_bytes,
            "error": p.predicted.error,
            "kept": sum(1 for c in p.choices.values() if c == KEEP),
            "over_all_4bit": p.predicted.over_all_4bit,
            **{f"in:{t}": sum(1 for c in p.choices.values() if c == t) for t in p.tiers[1:]},
        })
    return pd.DataFrame(rows)
