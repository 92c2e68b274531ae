"""refine(): re-plan on measured end-to-end KL gradients, a few rounds, with the compute bounded by the caller.

The table's scores are measured once, each module against an otherwise fixed model. Refinement
measures instead, in the model as the plan would leave it, how much each still-quantized
module's options would change the KL divergence from 16-bit on calibration data
(:func:`analysis.endtoend.restore_gains`, one forward and backward pass over the calibration
batches per round): going back to 16-bit, or, for a plan over a blocksize menu (``nf4``,
``nf4-bs32``), moving to any other 4-bit entry, all from the same gradient and put on one scale
by :mod:`planner.refine_scores`. The quantized context is the plan's: each module computes in the
format the previous round planned for it (round 1: the table's plan; modules it kept 16-bit by
measurement in the first tier). The budget is spent in ``rounds`` equal steps: round r plans
with those scores within r/rounds of the bytes the budget allows beyond the smallest plan,
keeping the 16-bit choices of earlier rounds (the 4-bit entries stay open: they are re-chosen
each round on the newest gradient). Modules restored early change the scores of the rest
(interactions and propagation are re-measured). Cost: ``rounds`` forward+backward passes over
at most ``max_batches`` calibration batches against the 16-bit reference (where the logits are plain
``lm_head(hidden)``, the 16-bit last hidden states the analysis or the verification kept, lm_head run in token
chunks; else each batch's 16-bit logits from one more forward, dropped after it); with a menu, one more
de-quantization per module, batch and other entry.

The gradient pass is injected (``gains``: :data:`analysis.endtoend.GainsMeasure`): in a loaded model
by default, or block by block from disk for a model larger than memory
(:class:`analysis.stream_gains.StreamedGains`, ``--max-memory``); the rounds are the same either way.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from quantplan.analysis.endtoend import GainsMeasure, RestoreGains, restore_gains
from quantplan.analysis.formats import FourBit, format_from_dict
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache

from .config import PlanConfig
from .plan_types import KEEP, Plan, Refinement, RefinementRound
from .reasons import Reason, ReasonKind
from .refine_scores import menu_scores


def refine(table, budget, model=None, calibration=None, *, config: PlanConfig | None = None, rounds: int = 4,
           batch_size: int = 4, max_batches: int | None = None, reference: KLReference | None = None,
           cache: QuantCache | None = None, progress: bool = True, gains: GainsMeasure | None = None) -> Plan:
    """The plan for ``budget`` chosen by ``rounds`` rounds of measured restore gains (see module docstring).

    ``gains`` measures each round's gradient pass; without it, ``model`` (16-bit, loaded) and ``calibration``
    (or ``reference`` and ``cache``) measure it in memory.
    """
    if rounds < 1:
        raise ValueError(f"--refine {rounds}: give a number of rounds of at least 1 (0 turns refinement off)")
    config = config or PlanConfig()
    first = config.plan(table, budget)
    menu = _menu(first)
    if gains is None:
        if model is None and reference is None:
            raise ValueError("refine() measures in a loaded model (model=, calibration=) or with gains=: pass one")
        reference = reference or KLReference(model, calibration, batch_size, max_batches, progress=progress)
        cache = cache or QuantCache(reference.model, menu[first.tiers[0]])
        gains = in_memory_gains(reference, cache, progress)
    measured = {n for n in first.kept if first.reasons[n].kind is ReasonKind.MEASURED}
    floor = config.weights_only().problem(table).floor  # every free module in its smallest format
    room = first.budget.bytes - floor
    free = [n for n, c in first.choices.items() if c != KEEP or n in measured]
    decided, history, current = {}, [], first
    for r in range(1, rounds + 1):
        planned = {n: current.choices[n] if current.choices[n] in menu else first.tiers[0]
                   for n in free if n not in decided}  # the context: each module in its planned format
        result = gains(list(planned), {n: menu[t] for n, t in planned.items()}, menu)
        history.append(RefinementRound(round=r, kept_before=len(decided), kld_before=result.kld))
        if progress:
            print(f"quantplan: refinement round {r}/{rounds}: calibration KL {result.kld:.4g} with "
                  f"{len(decided)} module(s) restored so far")
        limit = floor + room * r // rounds if r < rounds else first.budget.bytes
        current = config.weights_only().plan(table, int(limit), scores=menu_scores(result, planned),
                                             decided=decided)
        for name in current.kept:
            if name not in decided and current.reasons[name].kind is ReasonKind.MEASURED:
                decided[name] = Reason(ReasonKind.REFINED, f"kept in round {r}/{rounds} (measured KL gain "
                                       f"{result.gains.get(name, float('nan')):.3g} nats/token in the quantized "
                                       "context)")
    refinement = Refinement(rounds=rounds, tokens=result.tokens, history=tuple(history),
                            objective_before=first.objective)
    return replace(current, budget=first.budget, device=first.device,
                   checks=replace(current.checks, refinement=refinement))


def in_memory_gains(reference: KLReference, cache: QuantCache, progress: bool = True) -> GainsMeasure:
    """The gradient pass of each round in the loaded model of ``reference`` (:func:`analysis.endtoend.restore_gains`
    with ``cache``'s round trips)."""
    return partial(_in_memory, reference, cache, progress)


def _in_memory(reference: KLReference, cache: QuantCache, progress: bool, quantized, formats, menu) -> RestoreGains:
    return restore_gains(reference.model, reference, cache, quantized, formats=formats, menu=menu, progress=progress)


def _menu(first: Plan) -> dict[str, FourBit]:
    """Tier -> 4-bit format of the plan's tiers; refused (naming the fix) when one is not a 4-bit format."""
    menu = {t: format_from_dict(first.format_of(t)) for t in first.tiers}
    if other := [t for t, f in menu.items() if not isinstance(f, FourBit)]:
        four = [t for t, f in menu.items() if isinstance(f, FourBit)] or ["nf4"]
        raise ValueError(f"refinement simulates 4-bit formats, and this plan may use {other} (not a 4-bit format): "
                         f"pass --tiers {','.join(four)} with --refine, or drop --refine")
    return menu
