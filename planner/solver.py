"""Exact multiple-choice knapsack: pick one option per item, minimise error, bytes within budget.

Each item (a module, or a group of modules that must share a format) has options (4-bit,
8-bit, 16-bit, ...) with a byte cost and a predicted error. ``solve`` finds the optimum by
Lagrangian reduction plus dynamic programming over the few items left undecided (see its
docstring); ``greedy`` is the error-saved-per-byte heuristic it is compared with.
"""

from __future__ import annotations

import math
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


def solve(items: list[list[Option]], capacity: int, first_core: int = 64) -> Solution:
    """Exact minimum-error choice of one option per item with total cost <= capacity.

    1. Lagrangian reduction: the LP relaxation (convex-hull greedy) gives a lower bound and a
       multiplier λ; an option whose reduced cost lifts the bound above a known solution's
       error cannot be in a better solution and is dropped.
    2. A better known solution: the ``first_core`` undecided items closest to the LP break
       point are solved exactly (the rest at their Lagrangian choice), then step 1 is
       repeated with it, which leaves far fewer undecided items.
    3. The remaining core is solved exactly by dynamic programming over Pareto-optimal
       (bytes, error) states, pruned by the same Lagrangian bound.
    Integers throughout for bytes, so the budget holds exactly; the result is optimal.
    """
    if not items:
        return Solution((), 0, 0.0)
    cheapest = sum(min(o.cost for o in opts) for opts in items)
    if cheapest > capacity:
        raise Infeasible(f"needs at least {cheapest} bytes, budget is {capacity}")
    kept = [_undominated(opts) for opts in items]
    lam, lower = _lagrangian_bound(items, kept, capacity)
    best = list(greedy(items, capacity, kept).picks)
    choices, gaps = _reduce(items, kept, lam, lower, _error(items, best))
    lagrangian = [min(opts, key=lambda j, i=i: (items[i][j].error + lam * items[i][j].cost, items[i][j].cost))
                  for i, opts in enumerate(kept)]
    near = sorted((i for i in range(len(items)) if len(choices[i]) > 1), key=lambda i: gaps[i])[:first_core]
    best = _improve(items, choices, near, lagrangian, capacity, lam, best)
    choices, gaps = _reduce(items, kept, lam, lower, _error(items, best))
    core = [i for i in range(len(items)) if len(choices[i]) > 1]
    fixed = [c[0] for c in choices]
    best = _improve(items, choices, core, fixed, capacity, lam, best)
    return _solution(items, best)


def _reduce(items, kept, lam, lower, upper):
    """Options that could still beat ``upper``, and each item's gap to its second-best reduced cost."""
    limit = upper + 1e-9 * max(1.0, abs(upper))
    choices, gaps = [], []
    for i, opts in enumerate(kept):
        reduced = {j: items[i][j].error + lam * items[i][j].cost for j in opts}
        base = min(reduced.values())
        choices.append([j for j in opts if lower + reduced[j] - base <= limit])
        gaps.append(sorted(reduced.values())[1] - base if len(opts) > 1 else math.inf)
    return choices, gaps


def _improve(items, choices, free, fixed_picks, capacity, lam, best):
    """Solve the ``free`` items exactly with the others at ``fixed_picks``; keep it if it beats ``best``."""
    in_free = set(free)
    room = capacity - sum(items[i][fixed_picks[i]].cost for i in range(len(items)) if i not in in_free)
    picks = _pareto_dp([items[i] for i in free], [choices[i] for i in free], room, lam, _error(items, best))
    if picks is None:
        return best
    candidate = list(fixed_picks)
    for i, j in zip(free, picks, strict=True):
        candidate[i] = j
    fits = sum(items[i][p].cost for i, p in enumerate(candidate)) <= capacity
    return candidate if fits and _error(items, candidate) < _error(items, best) else best


def _pareto_dp(opts, choices, room, lam, upper):
    """Exact min-error choice for a few items by dynamic programming over (cost, error) states.

    States stay Pareto-optimal (none both dearer and worse than another) and are dropped when
    even the Lagrangian bound of the items still to come cannot bring them under ``upper``,
    the error of a known solution. Returns the picks, or None when no state beats ``upper``.
    """
    n = len(opts)
    if n == 0:
        return [] if room >= 0 else None
    reduced = [min(opts[i][j].error + lam * opts[i][j].cost for j in choices[i]) for i in range(n)]
    cheapest = [min(opts[i][j].cost for j in choices[i]) for i in range(n)]
    bound_rest = np.r_[np.cumsum(reduced[::-1])[::-1], 0.0]
    cost_rest = np.r_[np.cumsum(cheapest[::-1])[::-1], 0]
    limit = upper + 1e-9 * max(1.0, abs(upper))
    cost, error, back = np.zeros(1, dtype=np.int64), np.zeros(1), []
    for k in range(n):
        js = choices[k]
        c = np.concatenate([cost + opts[k][j].cost for j in js])
        e = np.concatenate([error + opts[k][j].error for j in js])
        parent, pick = np.tile(np.arange(len(cost)), len(js)), np.repeat(js, len(cost))
        ok = (c + cost_rest[k + 1] <= room) & (e + bound_rest[k + 1] - lam * (room - c) <= limit)
        c, e, parent, pick = c[ok], e[ok], parent[ok], pick[ok]
        order = np.lexsort((e, c))
        c, e, parent, pick = c[order], e[order], parent[order], pick[order]
        pareto = e < np.minimum.accumulate(np.r_[np.inf, e[:-1]])
        cost, error = c[pareto], e[pareto]
        back.append((parent[pareto], pick[pareto]))
        if not len(cost):
            return None
    state, picks = int(np.argmin(error)), [0] * n
    for k in range(n - 1, -1, -1):
        parent, pick = back[k]
        picks[k], state = int(pick[state]), int(parent[state])
    return picks


def _error(items, picks) -> float:
    return float(sum(items[i][p].error for i, p in enumerate(picks)))


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


def _solution(items, picks) -> Solution:
    return Solution(
        tuple(picks),
        sum(items[i][p].cost for i, p in enumerate(picks)),
        float(sum(items[i][p].error for i, p in enumerate(picks))),
    )
