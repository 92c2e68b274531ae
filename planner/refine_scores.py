"""The refinement's per-(module, format) scores: one gradient, every entry of a 4-bit menu, on one scale.

A refinement round measures, in the quantized context of the current plan (each module in its
planned format Ŵ_cur), the gradient g = ∂KL/∂W of every still-quantized module
(:func:`analysis.endtoend.restore_gains`). The knapsack (:mod:`planner.plan`) needs, per
module, the error of each option relative to keeping it 16-bit (which scores 0). Today's
score for the current format is the restore gain ``q_cur = ⟨g, Ŵ_cur − W⟩``, the first-order KL
decrease of restoring the module; it is kept unchanged, so a plan over one 4-bit format refines
exactly as before.

For another format f the plain first-order error is ``p_f = ⟨g, Ŵ_f − W⟩ = q_cur − gain_f``
(``gain_f = −⟨g, Ŵ_f − Ŵ_cur⟩``, :class:`analysis.endtoend.Move`). It is *not* on the scale of
``q_cur``: under the quadratic model that makes ``q_cur`` a score (KL(w) − KL(W) ≈ ½ eᵀHe with
e = w − W, so g = H e_cur and q_cur = e_curᵀHe_cur, twice the KL the module's rounding costs),
``p_f = e_curᵀHe_f`` is a cross term, while the same quantity for f is ``q_f = e_fᵀHe_f``. Two
round trips of one weight (blocksize 64 and 32) share part of their error (the blocks whose
absmax is the same) and differ, about independently, in the rest; the gradient sees the
independent part only through its correlation with e_cur, so ``p_f`` undercounts it and would
rank every other format as better than it is (and the next round, linearised there, the other
way round). So the score of f estimates ``q_f`` from the same measurements: split
``e_f = β e_cur + r`` with ``β = ⟨e_f, e_cur⟩ / ‖e_cur‖²`` (r ⟂ e_cur); then exactly

    q_f = β² q_cur + 2β e_curᵀHr + rᵀHr = 2β p_f − β² q_cur + rᵀHr,

and the one term the gradient cannot give, the curvature along the uncorrelated part r, is
taken at the module's measured average, ``rᵀHr ≈ (q_cur / ‖e_cur‖²) ‖r‖²`` (the part of f's
rounding that is new costs, per squared unit, what the current rounding costs on average). For
f = cur this gives ``q_cur`` again (β = 1, r = 0), so every option of a module, 16-bit included,
is scored as twice its own first-order KL cost on one scale. Scores are clamped at 0 as the
planner clamps every score (a negative first-order estimate says "no worse than 16-bit"; 16-bit
then wins only where it is not dearer, and the cheaper 4-bit entry otherwise). A module no
gradient reached (NaN gain) keeps the table's scores.

Checked on a tiny random Llama (3 layers, 21 Linears, every module measured alone by its KL): the
cost of blocksize 32 over blocksize 64 in the all-blocksize-64 context is truly 0.70 (median over
modules), this score says 0.89, plain first order 0.51; the other way round (blocksize 64 in the
all-blocksize-32 context) truly 1.46, this score 1.15, plain first order 0.60, i.e. the wrong side
of 1: first order would move every module to whichever format it is not in.
"""

from __future__ import annotations

from collections.abc import Mapping

from quantplan.analysis.endtoend import Move, RestoreGains


def menu_scores(result: RestoreGains, current: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Tier -> module -> score (see module docstring) of every module ``result`` measured; ``current`` maps
    each measured module to the menu label it computed in."""
    scores: dict[str, dict[str, float]] = {}
    for name, moves in result.moves.items():
        restore = result.gains.get(name, float("nan"))
        if restore != restore:
            continue
        here = moves[current[name]]
        for label, move in moves.items():
            scores.setdefault(label, {})[name] = move_score(restore, here, move)
    return scores


def move_score(restore: float, here: Move, move: Move) -> float:
    """Twice the estimated KL cost of a module in the format of ``move``, relative to 16-bit (module docstring):
    ``restore`` is its measured restore gain q_cur, ``here`` its :class:`Move` to the current format."""
    norm = here.error_sq  # ‖e_cur‖²
    if norm <= 0:  # the current round trip is exact: only the first-order term is known
        return max(restore - move.gain, 0.0)
    beta = move.overlap / norm
    first_order = restore - move.gain  # p_f = ⟨g, Ŵ_f − W⟩
    residual = max(move.error_sq - beta * move.overlap, 0.0)  # ‖r‖² = ‖e_f‖² − ⟨e_f, e_cur⟩² / ‖e_cur‖²
    curvature = max(restore, 0.0) / norm
    return max(2 * beta * first_order - beta * beta * restore + curvature * residual, 0.0)
