"""verify(): never worse than nothing. Measure the plan's KL divergence from 16-bit on calibration data and
fall back to the best measured alternative when the plan does not beat plain all-4-bit.

Scores predict; this checks. In the 16-bit model, with bitsandbytes' round trip swapped in
(:class:`analysis.simulate.QuantCache`), the mean next-token KL divergence on the calibration
batches is measured for all-4-bit (what a plain ``BitsAndBytesConfig`` load gives), the plan,
and, for a plan over a blocksize menu, the plans at the same budget with one format of the menu
each (:func:`single_format_siblings`); the lowest-KL planned candidate ships. If none beats
all-4-bit, the heuristic alternatives at the plan's bytes are measured too (first+last layers,
largest weight error; :mod:`planner.baselines`), the planner says so and returns the alternative
with the lowest KL below all-4-bit's, or all-4-bit itself. The measurements go into
``plan.checks.verification`` (``plan.json``). Cost: one forward pass per variant (all-4-bit, the
plan, its siblings; the heuristics only after a failed check) over at most ``max_batches``
calibration batches, plus the 16-bit logits (their base forward is skipped where the analysis' calibration
pass of the same run kept the 16-bit last hidden states: :mod:`analysis.kept_hidden`), less the leading decoder
layers a variant shares with the 16-bit run or an earlier variant; the variants are compared batch by batch
(:func:`analysis.reference.calibration_klds`), and where the logits are plain ``lm_head(hidden)``
chunk of tokens by chunk (:mod:`analysis.head_chunks`): one chunk's logits are alive at a time,
never a batch × vocabulary tensor. A plan over a blocksize menu (several 4-bit formats) is
simulated with each module in its planned format; the all-4-bit reference and the heuristics use
the first tier (blocksize 64).

The KL measurement is injected (``measure``: variants -> :class:`analysis.reference.VariantKLs`):
in a loaded model by default (:class:`analysis.reference.InMemoryKLs`), or block by block from
disk for a model larger than memory (:class:`analysis.stream_variants.StreamedKLs`, ``--max-memory``);
both give the same numbers on a model that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from quantplan.analysis.formats import format_from_dict
from quantplan.analysis.reference import InMemoryKLs, KLReference, VariantKLs
from quantplan.analysis.simulate import QuantCache

from .baselines import all_4bit, baseline_keep_sets, plan_keep_set
from .plan import replan_keeping
from .plan_types import Plan, Verification
from .reasons import Reason, ReasonKind

PLAN = "plan"


#: variants (label -> module -> 4-bit format, None: the plan's) -> their mean KLs and the tokens measured
KLMeasure = Callable[[Mapping[str, Mapping]], VariantKLs]


def verify(table, chosen: Plan, model=None, calibration=None, *, batch_size: int = 4, max_batches: int | None = None,
           reference: KLReference | None = None, cache: QuantCache | None = None, progress: bool = True,
           measure: KLMeasure | None = None, siblings: Mapping[str, Plan] | None = None) -> Plan:
    """``chosen`` with its verification recorded, or the best measured alternative (see module docstring).

    ``measure`` runs the KL measurement; without it, ``model`` (16-bit, loaded) and ``calibration``
    (or ``reference`` and ``cache``) measure it in memory. ``siblings`` (label -> plan at the same
    budget with one 4-bit format of the menu: :func:`single_format_siblings`) are measured beside the plan
    and the lowest-KL planned candidate ships.
    """
    if any(chosen.format_of(t).get("bits") != 4 for t in chosen.tiers):  # the simulation knows 4-bit only
        print("quantplan: the end-to-end check simulates 4-bit formats only: skipped for a multi-tier plan with an 8-bit tier")
        return chosen
    if measure is None:
        if model is None and reference is None:
            raise ValueError("verify() measures in a loaded model (model=, calibration=) or with measure=: pass one")
        reference = reference or KLReference(model, calibration, batch_size, max_batches, progress=progress)
        measure = InMemoryKLs(reference, cache or QuantCache(reference.model, format_from_dict(chosen.quant)))
    tier = chosen.tiers[0]
    nothing = all_4bit(table, tier)
    siblings = dict(siblings or {})
    variants = {nothing.label: nothing, PLAN: plan_keep_set(table, chosen)}
    variants.update({label: plan_keep_set(table, sibling) for label, sibling in siblings.items()})
    measured = measure(variant_configs(variants))
    kld = dict(measured.kld)
    plans = (PLAN, *siblings)
    if not kld[_best(kld, plans)] < kld[nothing.label] and not chosen.vllm_safe:
        # no planned candidate beats all-4-bit: measure the fallbacks (the heuristics do not know fused groups)
        fallbacks = {k.label: k for k in baseline_keep_sets(table, chosen, seeds=())}
        variants.update(fallbacks)
        kld.update(measure(variant_configs(fallbacks)).kld)
    winner = choose(kld, plans, nothing.label)
    record = Verification(calibration_kld=kld, tokens=measured.tokens, all_4bit=nothing.label, chosen=winner,
                          plans=plans)
    if winner in plans:
        shipped = siblings.get(winner, chosen)
        if winner != PLAN:
            print(f"quantplan: verified on calibration data: at the plan's bytes the {winner.removeprefix(PLAN + ', ')} "
                  f"plan's KL {kld[winner]:.4g} < the plan's {kld[PLAN]:.4g} (all-4-bit {kld[nothing.label]:.4g} "
                  "nats/token): it ships")
        elif progress:
            print(f"quantplan: verified on calibration data: the plan's KL {kld[PLAN]:.4g} < all-4-bit "
                  f"{kld[nothing.label]:.4g} nats/token")
        return replace(shipped, checks=replace(chosen.checks, verification=record))
    print(f"quantplan: the plan's calibration KL {kld[PLAN]:.4g} is not below all-4-bit's {kld[nothing.label]:.4g} "
          f"nats/token: falling back to {winner} ({kld[winner]:.4g}). Try more or other calibration data "
          f"(--calib), --refine, or another --objective.")
    reason = Reason(ReasonKind.FALLBACK, f"{winner} (measured calibration KL {kld[winner]:.4g} vs plan {kld[PLAN]:.4g})")
    fallback = replan_keeping(table, chosen, variants[winner].kept, reason)
    return replace(fallback, checks=replace(chosen.checks, verification=record))


def _best(kld: dict[str, float], plans: tuple[str, ...]) -> str:
    """The lowest-KL planned candidate, NaN ones left out (the plan on a tie, or when all are NaN)."""
    measured = [label for label in plans if kld[label] == kld[label]]
    return min(measured, key=kld.get) if measured else plans[0]  # min keeps the first of equal values


def variant_configs(variants) -> dict[str, dict]:
    """label -> module -> its 4-bit format (None: the plan's), what a KL measurement takes."""
    return {label: {n: keep.formats.get(n) for n in sorted(keep.quantized)} for label, keep in variants.items()}


def choose(kld: dict[str, float], plans: tuple[str, ...], all_4bit_label: str) -> str:
    """The lowest-KL planned candidate (``plans``: the plan first, then its siblings; the plan on a tie) if it is
    below all-4-bit's, else the lowest-KL variant below all-4-bit's, else all-4-bit."""
    best = _best(kld, plans)
    if kld[best] < kld[all_4bit_label]:
        return best
    better = {label: v for label, v in kld.items() if label not in plans and v < kld[all_4bit_label]}
    return min(better, key=better.get) if better else all_4bit_label


def single_format_siblings(table, chosen: Plan,
                           plan_with_tiers: Callable[[tuple[str, ...]], Plan | None]) -> dict[str, Plan]:
    """The plans at ``chosen``'s budget that use one 4-bit format of its menu each (label -> plan), leaving out
    any that makes the very same choices as ``chosen`` or an earlier sibling, or that cannot be planned
    (``plan_with_tiers`` returns None: that format alone does not fit the bytes); none for a single-format plan.

    The table's scores rank the menu's formats against 16-bit keeps to first order; at equal bytes a
    uniform format can measure better (on SmolLM2 at +10 % blocksize 32 everywhere + keeps beat the
    menu plan on held-out text: benchmarks/README.md), so the verification measures these too and the
    lowest calibration KL ships (one more forward per sibling over the verification's batches).
    """
    if len(chosen.tiers) < 2:
        return {}
    seen, siblings = [chosen.choices], {}
    for tier in chosen.tiers:
        sibling = plan_with_tiers((tier,))
        if sibling is not None and sibling.choices not in seen:
            seen.append(sibling.choices)
            siblings[f"{PLAN}, {tier} only"] = sibling
    return siblings
