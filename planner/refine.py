"""refine(): re-plan on measured end-to-end KL gradients, a few rounds, with the compute bounded by the caller.

The table's scores are measured once, each module against an otherwise fixed model. Refinement
measures instead, in the model as the plan would leave it, how much restoring each still-quantized
module would lower the KL divergence from 16-bit on calibration data
(:func:`analysis.endtoend.restore_gains`, one forward and backward pass over the calibration
batches per round), and spends the budget in ``rounds`` equal steps: round r plans with those
gains as scores within r/rounds of the bytes the budget allows beyond the fixed modules, keeping
the choices of earlier rounds. Modules restored early change the gains of the rest (interactions
and propagation are re-measured). Cost: ``rounds`` forward+backward passes over at most
``max_batches`` calibration batches, each with the 16-bit forward of its batch (the 16-bit
logits are computed per batch and dropped, not kept across rounds: one forward more per round
buys memory that does not grow with the calibration set).
"""

from __future__ import annotations

from dataclasses import replace

from quantplan.analysis.endtoend import restore_gains
from quantplan.analysis.formats import format_from_dict
from quantplan.analysis.reference import KLReference
from quantplan.analysis.simulate import QuantCache

from .config import PlanConfig
from .memory_model import ByteModel
from .plan_types import KEEP, Plan, Refinement, RefinementRound
from .reasons import Reason, ReasonKind


def refine(table, budget, model, calibration, *, config: PlanConfig | None = None, rounds: int = 4,
           batch_size: int = 4, max_batches: int | None = None, reference: KLReference | None = None,
           cache: QuantCache | None = None, progress: bool = True) -> Plan:
    """The plan for ``budget`` chosen by ``rounds`` rounds of measured restore gains (see module docstring)."""
    if rounds < 1:
        raise ValueError(f"--refine {rounds}: give a number of rounds of at least 1 (0 turns refinement off)")
    config = config or PlanConfig()
    first = config.plan(table, budget)
    if len(first.tiers) > 1 and config.tiers is None:  # the table's default blocksize menu: refine its reference
        print(f"quantplan: refinement plans 16-bit vs one 4-bit format: using {first.tiers[0]} only "
              f"(not the menu's {', '.join(first.tiers[1:])})")
        config = replace(config, tiers=(first.tiers[0],))
        first = config.plan(table, budget)
    if len(first.tiers) > 1:
        raise ValueError(f"refinement plans 16-bit vs one 4-bit format, and this plan may use {list(first.tiers)} "
                         f"(a blocksize menu or an 8-bit tier): pass --tiers {first.tiers[0]} with --refine, "
                         "or drop --refine")
    tier = first.tiers[0]
    reference = reference or KLReference(model, calibration, batch_size, max_batches, progress=progress)
    cache = cache or QuantCache(model, format_from_dict(first.quant))
    frame = ByteModel(table, [tier]).frame
    measured = {n for n in first.kept if first.reasons[n].kind is ReasonKind.MEASURED}
    floor = first.predicted.bytes - int(sum(frame.loc[n, "bytes_16bit"] - frame.loc[n, f"bytes:{tier}"]
                                            for n in measured))
    room = first.budget.bytes - floor
    free = [n for n, c in first.choices.items() if c != KEEP or n in measured]
    decided, history, current = {}, [], first
    for r in range(1, rounds + 1):
        quantized = [n for n in free if n not in decided]
        result = restore_gains(model, reference, cache, quantized, progress=progress)
        history.append(RefinementRound(round=r, kept_before=len(decided), kld_before=result.kld))
        if progress:
            print(f"quantplan: refinement round {r}/{rounds}: calibration KL {result.kld:.4f} with "
                  f"{len(decided)} module(s) restored so far")
        limit = floor + room * r // rounds if r < rounds else first.budget.bytes
        current = config.weights_only().plan(table, int(limit), scores=result.gains, decided=decided)
        for name in current.kept:
            if name not in decided and current.reasons[name].kind is ReasonKind.MEASURED:
                decided[name] = Reason(ReasonKind.REFINED, f"kept in round {r}/{rounds} (measured KL gain "
                                       f"{result.gains.get(name, float('nan')):.3g} nats/token in the quantized "
                                       "context)")
    refinement = Refinement(rounds=rounds, tokens=reference.tokens, history=tuple(history),
                            objective_before=first.objective)
    return replace(current, budget=first.budget, device=first.device, checks=replace(current.checks, refinement=refinement))
