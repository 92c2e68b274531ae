"""The whole trade-off: exact plans at evenly spaced budgets from all-4-bit to all-16-bit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import PlanConfig
from .plan_types import KEEP


def pareto_curve(table, points: int = 21, config: PlanConfig | None = None) -> pd.DataFrame:
    """One exact plan per budget step; columns: budget_bytes, bytes, footprint_bytes, error, kept, over_all_4bit,
    and with a blocksize menu one ``in:<tier>`` count per further tier (modules planned in it).

    The knapsack is built once (:class:`planner.plan.PlanProblem`) and solved at each budget; the
    steps need no skip list, so none is built."""
    config = (config or PlanConfig()).weights_only()  # the sweep is over the weights' bytes
    problem = config.problem(table)
    tiers = problem.bytes_model.tiers
    rows = []
    for budget in np.linspace(problem.all_4bit, problem.ceiling, points).astype(np.int64):
        if budget < problem.floor:
            continue  # below the floor that pins impose
        choices = problem.choose(int(budget))
        size = problem.bytes_model.size(choices)
        rows.append({
            "budget_bytes": int(budget),
            "bytes": size.bytes,
            "footprint_bytes": size.footprint_bytes,
            "error": problem.error(choices),
            "kept": sum(1 for c in choices.values() if c == KEEP),
            "over_all_4bit": size.bytes / problem.all_4bit - 1,
            **{f"in:{t}": sum(1 for c in choices.values() if c == t) for t in tiers[1:]},
        })
    return pd.DataFrame(rows)
