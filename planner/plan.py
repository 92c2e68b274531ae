"""plan(): choose which modules stay 16-bit under a memory budget, exactly, from a sensitivity table.

Every quantizable Linear is an item with options (each planned tier it supports, plus
16-bit); pins and non-quantizable modules are fixed; groups that must share a format (vLLM's
fused q/k/v and gate/up) become one item. The exact solver minimises the summed objective
within the budget. The result, a :class:`Plan`, is what ``export`` writes and what
``plan.json`` holds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import pandas as pd

from quantplan.analysis.table import SensitivityTable
from quantplan.common.sizes import format_bytes

from .budget import BudgetError, parse_budget
from .groups import fused_groups
from .memory_model import ByteModel
from .objective import OBJECTIVES, scores
from .pins import match_patterns
from .plan_types import KEEP, Plan, PlanBudget, Prediction
from .reasons import Reason, ReasonKind
from .skiplist import build_skip_list
from .solver import Option, solve


def plan(table: SensitivityTable, budget="+10%", *, objective: str = "auto", tiers: list[str] | None = None,
         keep: list[str] = (), quantize: list[str] = (), vllm_safe: bool = False, whole_blocks: bool = False,
         keep_lm_head: bool = True, priors: dict[str, Reason | str] | None = None,
         scores: dict[str, dict[str, float]] | None = None, decided: dict[str, Reason] | None = None) -> Plan:
    """The minimum-error choice of formats within ``budget`` (see :mod:`planner.budget`).

    ``priors`` (``{module: Reason}``, see :mod:`planner.priors`; a plain string is the detail of a
    ``PRIOR`` reason) pins modules 16-bit by rule. A ``quantize`` pattern overrides a prior.
    ``scores`` (tier -> module -> score) replaces the objective's score of each tier it names for
    the modules it names (NaN: keep the table's), and ``decided`` keeps modules 16-bit with the
    given :class:`Reason`: the end-to-end refinement (:mod:`planner.refine`) plans with them.
    """
    problem = PlanProblem.build(table, objective=objective, tiers=tiers, keep=keep, quantize=quantize,
                                vllm_safe=vllm_safe, whole_blocks=whole_blocks, keep_lm_head=keep_lm_head,
                                priors=priors, scores=scores, decided=decided)
    parsed = parse_budget(budget)
    capacity = problem.capacity(parsed)
    if capacity >= problem.ceiling:
        warnings.warn(f"budget {parsed.spec} = {format_bytes(capacity)} reaches the 16-bit size "
                      f"{format_bytes(problem.ceiling)}: every module stays 16-bit, so the export is a plain 16-bit "
                      "checkpoint (no 4-bit module)", stacklevel=2)
    choices = problem.choose(capacity)
    reasons = problem.explain(choices)
    return _assemble(table, problem.bytes_model, problem.model, choices, reasons,
                     PlanBudget(str(parsed.spec), int(capacity)), problem.objective, vllm_safe or whole_blocks)


@dataclass(frozen=True)
class PlanProblem:
    """The knapsack of one table and configuration, built once and solved at any capacity (the Pareto sweep)."""

    bytes_model: ByteModel
    model: pd.DataFrame  # per Linear: bytes and scores per tier (:func:`_candidates`)
    objective: str
    fixed: dict  # module -> KEEP, decided before the solver
    reasons: dict  # module -> Reason of the fixed ones
    items: list  # solver items: each a list of Options
    members: list  # the module names each item decides together
    pinned_quant: dict
    bytes_fixed: int  # the 16-bit bytes of the fixed modules
    floor: int  # the smallest bytes any plan can have
    ceiling: int  # the 16-bit size
    all_4bit: int  # what relative budgets count from

    @classmethod
    def build(cls, table: SensitivityTable, *, objective: str = "auto", tiers=None, keep=(), quantize=(),
              vllm_safe: bool = False, whole_blocks: bool = False, keep_lm_head: bool = True, priors=None,
              scores=None, decided=None) -> PlanProblem:
        """The items, fixed modules and byte bounds of :func:`plan`'s problem (its arguments, no budget)."""
        if objective == "auto":  # the measured winner on held-out data when the table has it (planner.objective)
            objective = "fisher" if table.meta.get("fisher") else "output"
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: choose one of auto, {', '.join(OBJECTIVES)}")
        tiers = list(tiers or default_tiers(table))
        table.check_matches(formats=tiers)
        bytes_model = ByteModel(table, tiers)
        model = _candidates(table, bytes_model, objective)
        _replace_scores(model, tiers, scores or {})
        fixed, reasons, pinned_quant = _fixed(model, keep, quantize, keep_lm_head, priors, decided)
        if vllm_safe or whole_blocks:
            _tie_fixed_sets(model.index, fixed, reasons, pinned_quant, whole_blocks)
        items, members = _items(model, tiers, fixed, pinned_quant, vllm_safe, whole_blocks)
        bytes_fixed = int(sum(model.loc[n, "bytes_16bit"] for n in fixed))
        floor = bytes_model.other + bytes_fixed + sum(min(o.cost for o in opts) for opts in items)
        return cls(bytes_model, model, objective, fixed, reasons, items, members, pinned_quant, bytes_fixed, floor,
                   bytes_model.sixteen_bit_size().bytes, bytes_model.all_4bit_size(tiers[0]).bytes)

    def capacity(self, parsed) -> int:
        """A parsed budget in bytes; refused (BudgetError, naming the minimum) below the floor."""
        capacity = parsed.resolve(self.all_4bit, self.ceiling)
        if capacity < self.floor:
            raise BudgetError(
                f"budget {parsed.spec} = {format_bytes(capacity)} is below this model's minimum of "
                f"{format_bytes(self.floor)} ({self.floor} bytes: every quantizable module in its smallest format, "
                f"pins, priors and non-quantizable modules 16-bit): raise the budget to at least that{self._priors_hint()}")
        return capacity

    def _priors_hint(self) -> str:
        """Where rule priors hold part of the minimum, how much, and the flag that plans without them."""
        held = [n for n, r in self.reasons.items() if r.kind is ReasonKind.PRIOR]
        if not held:
            return ""
        size = int(sum(self.model.loc[n, "bytes_16bit"] for n in held))
        return (f", or plan without the rule priors (--priors none): they keep {len(held)} module(s) 16-bit, "
                f"{format_bytes(size)} ({held[0]}{', ...' if len(held) > 1 else ''})")

    def choose(self, capacity: int) -> dict:
        """Module -> KEEP or tier: the exact solver's picks within ``capacity`` bytes, plus the fixed modules."""
        solution = solve(self.items, capacity - self.bytes_model.other - self.bytes_fixed)
        choices = dict(self.fixed)
        for options, item, pick in zip(self.items, self.members, solution.picks, strict=True):
            for name in item:
                choices[name] = options[pick].label
        return choices

    def explain(self, choices: dict) -> dict:
        """Module -> :class:`Reason` of ``choices``: the fixed modules' own, else what the solver decided."""
        reasons = dict(self.reasons)
        for item in self.members:
            for name in item:
                if name not in reasons:
                    reasons[name] = _measured_reason(choices[name], self.pinned_quant.get(name), item)
        return reasons

    def error(self, choices: dict) -> float:
        """The objective summed over the modules ``choices`` quantizes."""
        labels = pd.Series(choices, dtype=object).reindex(self.model.index)
        return float(sum(self.model.loc[labels == tier, f"score:{tier}"].sum() for tier in self.bytes_model.tiers))


def _replace_scores(model, tiers, scores) -> None:
    """``score:<tier>`` of the modules ``scores`` (tier -> module -> score) names, clamped at 0 (NaN: the table's)."""
    if unknown := sorted(set(scores) - set(tiers)):
        raise ValueError(f"scores given for {unknown}, which this plan does not use (tiers {tiers}): score the "
                         "planned tiers, or plan with --tiers naming them")
    for tier, given in scores.items():
        column = f"score:{tier}"
        model[column] = [max(float(given[n]), 0.0) if n in given and given[n] == given[n]
                         else model.loc[n, column] for n in model.index]  # NaN (never measured) keeps the score


def _fixed(model, keep, quantize, keep_lm_head, priors, decided):
    """(fixed, reasons, pinned_quant): the modules kept 16-bit before the solver runs, and why."""
    decided = dict(decided or {})
    pinned_keep = match_patterns(keep, model.index, "--keep")
    pinned_quant = match_patterns(quantize, model.index, "--quantize")
    if both := sorted(set(pinned_keep) & set(pinned_quant)):
        raise ValueError(f"{both[:3]} matched by both --keep and --quantize: make the patterns disjoint")
    priors = {n: r if isinstance(r, Reason) else Reason(ReasonKind.PRIOR, r) for n, r in (priors or {}).items()}
    if unknown := sorted(set(priors) - set(model.index)):
        raise ValueError(f"priors name {unknown[:3]}, which are not Linear modules of this table: "
                         "make the priors from this table (planner.priors.rule_priors)")
    reasons, fixed = {}, {}
    for name, quantizable, reason, group in zip(model.index, model["quantizable"], model["reason"], model["group"],
                                                strict=True):
        if not quantizable:
            fixed[name], reasons[name] = KEEP, Reason(ReasonKind.NOT_QUANTIZABLE, str(reason))
        elif name in decided:
            fixed[name], reasons[name] = KEEP, decided[name]
        elif name in pinned_keep:
            fixed[name], reasons[name] = KEEP, Reason(ReasonKind.PINNED_KEEP, pinned_keep[name])
        elif name in priors and name not in pinned_quant:
            fixed[name], reasons[name] = KEEP, priors[name]
        elif group == "lm_head" and keep_lm_head and name not in pinned_quant:
            fixed[name], reasons[name] = KEEP, Reason(ReasonKind.LM_HEAD, "kept 16-bit as transformers does by default")
    return fixed, reasons, pinned_quant


def replan_keeping(table: SensitivityTable, base: Plan, kept, reason: Reason) -> Plan:
    """``base`` with exactly ``kept`` (plus its non-quantizable modules) in 16-bit, every other module in
    its first tier; used when an end-to-end check replaces a plan by a measured alternative."""
    tier = base.tiers[0]
    bytes_model = ByteModel(table, base.tiers)
    model = _candidates(table, bytes_model, base.objective)
    kept = set(kept)
    choices, reasons = {}, {}
    for name, row in model.iterrows():
        base_reason = base.reasons.get(name)
        fixed = (base_reason is not None and base_reason.kind is ReasonKind.NOT_QUANTIZABLE) \
            or not row[f"supported:{tier}"]
        if fixed or name in kept:
            choices[name] = KEEP
            reasons[name] = base.reasons[name] if fixed or base.choices.get(name) == KEEP else reason
        else:
            choices[name] = tier
            reasons[name] = base.reasons[name] if base.choices.get(name) == tier else reason
    return replace(_assemble(table, bytes_model, model, choices, reasons, base.budget, base.objective,
                             base.vllm_safe), device=base.device)


def _candidates(table: SensitivityTable, bytes_model: ByteModel, objective: str) -> pd.DataFrame:
    """The byte model's frame (``supported:``/``bytes:``/``footprint:<tier>``) plus identity and ``score:<tier>``."""
    linear = table.df[table.df["kind"] == "Linear"]
    base = bytes_model.frame.join(linear.drop_duplicates("name").set_index("name")[
        ["layer", "module_type", "params", "reason"]])
    for tier in bytes_model.tiers:
        base[f"score:{tier}"] = scores(linear[linear["format"] == tier].set_index("name"), objective, table)
    return base


def _items(model, tiers, fixed, pinned_quant, vllm_safe, whole_blocks):
    """Solver items (option lists) and, for each, the module names it decides together."""
    free = [n for n in model.index if n not in fixed]
    groups = fused_groups(free, whole_blocks) if vllm_safe or whole_blocks else [[n] for n in free]
    column = {c: model[c].to_dict() for c in model.columns if c.split(":")[0] in ("supported", "bytes", "score")
              or c == "bytes_16bit"}  # plain dicts: a pandas lookup per module and tier costs ~0.1 s a plan
    items, members = [], []
    for names in groups:
        options = []
        for tier in tiers:
            if all(column[f"supported:{tier}"][n] for n in names):
                options.append(Option(tier, int(sum(column[f"bytes:{tier}"][n] for n in names)),
                                      float(sum(column[f"score:{tier}"][n] for n in names))))
        if not any(n in pinned_quant for n in names) or not options:
            options.append(Option(KEEP, int(sum(column["bytes_16bit"][n] for n in names)), 0.0))
        items.append(options)
        members.append(names)
    return items, members


def _tie_fixed_sets(names, fixed, reasons, pinned_quant, whole_blocks) -> None:
    """Keep 16-bit every member of a fused set (or block) one of whose members is fixed 16-bit (a pin, a prior,
    a module bitsandbytes cannot take), so that --vllm-safe / --whole-blocks plans never split a set."""
    for group in fused_groups(list(names), whole_blocks):
        anchor = next((n for n in group if fixed.get(n) == KEEP), None)
        if anchor is None:
            continue
        if clash := [n for n in group if n in pinned_quant and n not in fixed]:
            raise ValueError(f"{anchor} stays 16-bit ({reasons[anchor].text}) but {clash[0]}, fused with it, is "
                             "pinned by --quantize: with --vllm-safe/--whole-blocks a set shares one format, "
                             "so drop one of the two")
        for name in group:
            if name not in fixed:
                fixed[name] = KEEP
                reasons[name] = Reason(reasons[anchor].kind, f"{reasons[anchor].detail} (fused with {anchor}, "
                                       "which stays 16-bit)")


def default_tiers(table) -> list[str]:
    """The table's 4-bit menu: every 4-bit format of the first one's quant type (``nf4``, ``nf4-bs32``...),
    blocksize 64 first, since ``tiers[0]`` is the all-4-bit reference (what a plain BitsAndBytesConfig gives)."""
    four = [f for f in table.meta.get("formats", []) if f.get("bits") == 4]
    if not four:
        raise ValueError("the sensitivity table measured no 4-bit format: re-run analyze with --formats nf4")
    kind = four[0].get("quant_type", four[0]["name"])
    menu = [f for f in four if f.get("quant_type", f["name"]) == kind]
    return [f["name"] for f in sorted(menu, key=lambda f: f.get("blocksize", 64) != 64)]


def _measured_reason(label, pin, item) -> Reason:
    shared = f" (decided with {len(item) - 1} other module(s) of its fused set/block)" if len(item) > 1 else ""
    if pin:
        return Reason(ReasonKind.PINNED_QUANTIZE, f"{pin}{shared}")
    return Reason(ReasonKind.MEASURED, f"{'kept 16-bit' if label == KEEP else label}{shared}")


def _assemble(table, bytes_model: ByteModel, model, choices, reasons, budget: PlanBudget, objective,
              vllm_safe) -> Plan:
    tiers = bytes_model.tiers
    size = bytes_model.size(choices)
    all_4bit = bytes_model.all_4bit_size(tiers[0]).bytes
    error = sum(0.0 if c == KEEP else model.loc[n, f"score:{c}"] for n, c in choices.items())
    error_all_4bit = float(model.loc[bytes_model.all_4bit_mask(tiers[0]), f"score:{tiers[0]}"].sum())
    kept = [n for n, c in choices.items() if c == KEEP]
    quantized = [n for n, c in choices.items() if c != KEEP]
    return Plan(
        choices=choices, reasons=reasons, skip_modules=build_skip_list(kept, quantized),
        budget=budget, objective=objective, tiers=tiers, vllm_safe=vllm_safe,
        predicted=Prediction(bytes=size.bytes, footprint_bytes=size.footprint_bytes, error=float(error),
                             bytes_all_4bit=all_4bit, error_all_4bit=error_all_4bit,
                             bytes_16bit=bytes_model.sixteen_bit_size().bytes,
                             over_all_4bit=size.bytes / all_4bit - 1),
        table_hash=table.content_hash, model_id=table.meta.get("model_id", ""),
        model_fingerprint=table.meta.get("model_fingerprint", ""),
        quant=next(f for f in table.meta["formats"] if f["name"] == tiers[0]) if tiers else {},
        formats={f["name"]: dict(f) for f in table.meta["formats"] if f["name"] in tiers},
        bare_matrices=dict(table.meta.get("bare_matrices") or {}),
        equalization=dict(table.meta.get("equalization") or {}),
    )
