"""Exact multiple-choice knapsack: pick one option per item, minimise error, bytes within budget.

Each item (a module, or a group of modules that must share a format) has options (4-bit,
8-bit, 16-bit, ...) with a byte cost and a predicted error. The problem is solved as a 0/1
integer program by HiGHS (through ``scipy.optimize.milp``) with a zero optimality gap, after
dropping options that another option of the same item dominates (no cheaper and no better).
The byte constraint is re-checked in exact integers afterwards. ``greedy`` is the
error-saved-per-byte heuristic the exact solver is compared with.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    label: str
    cost: int
    error: float


@dataclass(frozen=True)
class Solution:
    picks: tuple[int, ...]  # chosen option index per item
    cost: int
    error: float


class Infeasible(ValueError):
    """Even the cheapest option of every item exceeds the capacity."""


def solve(items: list[list[Option]], capacity: int) -> Solution:
    """Exact minimum-error choice of one option per item with total cost <= capacity.

    Lagrangian reduction first: the LP relaxation (convex hull greedy) gives a lower bound and
    a multiplier; any option whose reduced cost lifts the bound above the best known integer
    solution cannot be in a better one and is dropped. The few items left with a choice (the
    core) go to HiGHS with a zero gap. The result is optimal, not approximately so.
    """
    if not items:
        return Solution((), 0, 0.0)
    cheapest = sum(min(o.cost for o in opts) for opts in items)
    if cheapest > capacity:
        raise Infeasible(f"needs at least {cheapest} bytes, budget is {capacity}")
    kept = [_undominated(opts) for opts in items]
    lam, lower = _lagrangian_bound(items, kept, capacity)
    incumbent = greedy(items, capacity, kept)
    tolerance = 1e-9 * max(1.0, abs(incumbent.error))
    core_options = []
    for i, opts in enumerate(kept):
        base = min(items[i][j].error + lam * items[i][j].cost for j in opts)
        core_options.append([j for j in opts
                             if lower + items[i][j].error + lam * items[i][j].cost - base <= incumbent.error + tolerance])
    fixed = {i: opts[0] for i, opts in enumerate(core_options) if len(opts) == 1}
    core = [i for i in range(len(items)) if i not in fixed]
    if not core:
        best = _solution(items, [fixed[i] for i in range(len(items))])
        return best if best.cost <= capacity and best.error <= incumbent.error else incumbent
    room = capacity - sum(items[i][j].cost for i, j in fixed.items())
    core_min = sum(min(items[i][j].cost for j in core_options[i]) for i in core)
    if core_min > room:
        return incumbent
    picks = dict(fixed)
    picks.update(zip(core, _milp([items[i] for i in core], [core_options[i] for i in core], room), strict=True))
    best = _solution(items, [picks[i] for i in range(len(items))])
    return best if best.cost <= capacity and best.error < incumbent.error else incumbent


def greedy(items: list[list[Option]], capacity: int, kept: list[list[int]] | None = None) -> Solution:
    """Greedy by ratio: take hull upgrades in order of error saved per byte while they fit.

    This is the heuristic a hand-written planner would use; it can miss the optimum (an early
    large upgrade can block two smaller ones that together save more), which ``solve`` does not.
    """
    kept = kept or [_undominated(opts) for opts in items]
    picks = [opts[0] for opts in kept]
    spent = sum(items[i][p].cost for i, p in enumerate(picks))
    position = [0] * len(items)
    hulls = [_hull(items[i], kept[i]) for i in range(len(items))]
    for _, i, step in _increments(items, hulls):
        if position[i] != step:
            continue
        a, b = hulls[i][step], hulls[i][step + 1]
        extra = items[i][b].cost - items[i][a].cost
        if spent + extra <= capacity:
            spent += extra
            picks[i] = b
            position[i] = step + 1
    return _solution(items, picks)


def _hull(opts: list[Option], kept: list[int]) -> list[int]:
    """Lower convex hull of (cost, error) among undominated options, by increasing cost."""
    hull: list[int] = []
    for j in kept:
        while len(hull) >= 2:
            a, b = opts[hull[-2]], opts[hull[-1]]
            c = opts[j]
            # drop b if it lies on or above the segment a-c
            if (b.error - a.error) * (c.cost - a.cost) >= (c.error - a.error) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _increments(items, hulls):
    """Every hull step as (efficiency, item, step), most error saved per byte first."""
    steps = []
    for i, hull in enumerate(hulls):
        for step in range(len(hull) - 1):
            a, b = items[i][hull[step]], items[i][hull[step + 1]]
            steps.append(((a.error - b.error) / max(b.cost - a.cost, 1e-9), i, step))
    steps.sort(key=lambda s: -s[0])
    return steps


def _lagrangian_bound(items, kept, capacity) -> tuple[float, float]:
    """LP-optimal multiplier (error per byte at the break step) and the LP lower bound."""
    hulls = [_hull(items[i], kept[i]) for i in range(len(items))]
    spent = sum(items[i][h[0]].cost for i, h in enumerate(hulls))
    lam = 0.0
    for efficiency, i, step in _increments(items, hulls):
        extra = items[i][hulls[i][step + 1]].cost - items[i][hulls[i][step]].cost
        if spent + extra > capacity:
            lam = efficiency
            break
        spent += extra
    lower = sum(min(items[i][j].error + lam * items[i][j].cost for j in kept[i]) for i in range(len(items)))
    return lam, lower - lam * capacity


def _undominated(opts: list[Option]) -> list[int]:
    order = sorted(range(len(opts)), key=lambda j: (opts[j].cost, opts[j].error))
    kept, best_error = [], float("inf")
    for j in order:
        if opts[j].error < best_error:
            kept.append(j)
            best_error = opts[j].error
    return kept


def _milp(items, kept, capacity) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    columns = [(i, j) for i in range(len(items)) for j in kept[i]]
    cost = np.array([items[i][j].cost for i, j in columns], dtype=float)
    error = np.array([items[i][j].error for i, j in columns], dtype=float)
    rows = np.array([i for i, _ in columns])
    one_each = csr_array((np.ones(len(columns)), (rows, np.arange(len(columns)))), shape=(len(items), len(columns)))
    scale = max(cost.max(), 1.0)
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(cost[None, :] / scale, -np.inf, capacity / scale),
    ]
    with _quiet_stdout():  # some HiGHS builds print debug lines straight to fd 1
        result = milp(error, constraints=constraints, integrality=np.ones(len(columns)), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0, "presolve": True})
    if result.x is None:
        raise Infeasible(f"no choice fits in {capacity} bytes ({result.message})")
    picks = [0] * len(items)
    for (i, j), x in zip(columns, result.x, strict=True):
        if x > 0.5:
            picks[i] = j
    if sum(items[i][p].cost for i, p in enumerate(picks)) > capacity:  # solver tolerance: tighten, re-solve
        excess = sum(items[i][p].cost for i, p in enumerate(picks)) - capacity
        return _milp(items, kept, capacity - excess)
    return picks


@contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solution(items, picks) -> Solution:
    return Solution(
        tuple(picks),
        sum(items[i][p].cost for i, p in enumerate(picks)),
        float(sum(items[i][p].error for i, p in enumerate(picks))),
    )
