"""plan(): choose which modules stay 16-bit under a memory budget, exactly, from a sensitivity table.

Every quantizable Linear is an item with options (each planned tier it supports, plus
16-bit); pins and non-quantizable modules are fixed; groups that must share a format (vLLM's
fused q/k/v and gate/up) become one item. The exact solver minimises the summed objective
within the budget. The result, a :class:`Plan`, is what ``export`` writes and what
``plan.json`` holds.
"""

from __future__ import annotations

import warnings

import pandas as pd
from quantplan.analysis.table import SensitivityTable

from .budget import BudgetError, format_bytes, parse_budget
from .groups import fused_groups
from .objective import OBJECTIVES, scores
from .pins import match_patterns
from .plan_types import KEEP, Plan
from .skiplist import build_skip_list
from .solver import Option, solve


def plan(table: SensitivityTable, budget="+10%", *, objective: str = "auto", tiers: list[str] | None = None,
         keep: list[str] = (), quantize: list[str] = (), vllm_safe: bool = False, whole_blocks: bool = False,
         keep_lm_head: bool = True, priors: dict[str, str] | None = None,
         scores: dict[str, float] | None = None, decided: dict[str, str] | None = None) -> Plan:
    """The minimum-error choice of formats within ``budget`` (see :mod:`planner.budget`).

    ``priors`` (``{module: reason}``, see :mod:`planner.priors`) pins modules 16-bit by rule; the
    plan reports them as ``prior: ...``. A ``quantize`` pattern overrides a prior.
    ``scores`` replaces the objective's score of the first tier for the modules it names, and
    ``decided`` keeps modules 16-bit with the given reason: the end-to-end refinement
    (:mod:`planner.refine`) plans with them.
    """
    if objective == "auto":  # the measured winner on held-out data when the table has it (planner.objective)
        objective = "fisher" if table.meta.get("fisher") else "output"
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of auto, {', '.join(OBJECTIVES)}")
    tiers = list(tiers or [_four_bit_formats(table)[0]])
    table.check_matches(formats=tiers)
    model = _candidates(table, tiers, objective)
    if scores:
        column = f"score:{tiers[0]}"
        model[column] = [max(float(scores[n]), 0.0) if n in scores and scores[n] == scores[n] else model.loc[n, column]
                         for n in model.index]  # a NaN score (never measured) keeps the objective's score
    decided = dict(decided or {})
    pinned_keep = match_patterns(keep, model.index, "--keep")
    pinned_quant = match_patterns(quantize, model.index, "--quantize")
    if both := sorted(set(pinned_keep) & set(pinned_quant)):
        raise ValueError(f"{both[:3]} matched by both --keep and --quantize: make the patterns disjoint")
    priors = dict(priors or {})
    if unknown := sorted(set(priors) - set(model.index)):
        raise ValueError(f"priors name {unknown[:3]}, which are not Linear modules of this table: "
                         "make the priors from this table (planner.priors.rule_priors)")

    reasons, fixed = {}, {}
    for name, row in model.iterrows():
        if not row["quantizable"]:
            fixed[name], reasons[name] = KEEP, f"not quantizable: {row['reason']}"
        elif name in decided:
            fixed[name], reasons[name] = KEEP, decided[name]
        elif name in pinned_keep:
            fixed[name], reasons[name] = KEEP, f"pinned: --keep {pinned_keep[name]}"
        elif name in priors and name not in pinned_quant:
            reason = priors[name]
            fixed[name], reasons[name] = KEEP, reason if reason.startswith("prior:") else f"prior: {reason}"
        elif row["group"] == "lm_head" and keep_lm_head and name not in pinned_quant:
            fixed[name], reasons[name] = KEEP, "lm_head: kept 16-bit as transformers does by default"
    items, members = _items(model, tiers, fixed, pinned_quant, vllm_safe, whole_blocks)

    bytes_fixed = sum(model.loc[n, "bytes_16bit"] for n in fixed)
    other = int(table.meta.get("other_bytes", 0))
    floor = other + bytes_fixed + sum(min(o.cost for o in opts) for opts in items)
    ceiling = other + int(model["bytes_16bit"].sum())
    all_4bit = _all_4bit_bytes(model, tiers[0], other)
    parsed = parse_budget(budget)
    capacity = parsed.resolve(all_4bit, ceiling)
    if capacity < floor:
        raise BudgetError(
            f"budget {parsed.spec} = {format_bytes(capacity)} is below this model's minimum of "
            f"{format_bytes(floor)} ({floor} bytes: every quantizable module in its smallest format, pins, priors "
            f"and non-quantizable modules 16-bit): raise the budget to at least that"
        )
    if capacity >= ceiling:
        warnings.warn(f"budget {parsed.spec} = {format_bytes(capacity)} reaches the 16-bit size "
                      f"{format_bytes(ceiling)}: every module stays 16-bit, so the export is a plain 16-bit checkpoint "
                      "(no 4-bit module)", stacklevel=2)

    solution = solve(items, capacity - other - bytes_fixed)
    choices = dict(fixed)
    for options, item, pick in zip(items, members, solution.picks, strict=True):
        label = options[pick].label
        for name in item:
            choices[name] = label
            if name not in reasons:
                reasons[name] = _measured_reason(model.loc[name], label, pinned_quant.get(name), item)
    return _assemble(table, model, choices, reasons, parsed.spec, capacity, objective, tiers, all_4bit,
                     ceiling, vllm_safe or whole_blocks)


def replan_keeping(table: SensitivityTable, base: Plan, kept, reason: str) -> Plan:
    """``base`` with exactly ``kept`` (plus its non-quantizable modules) in 16-bit, every other module in
    its first tier; used when an end-to-end check replaces a plan by a measured alternative."""
    tier = base.tiers[0]
    model = _candidates(table, base.tiers, base.objective)
    kept = set(kept)
    choices, reasons = {}, {}
    for name, row in model.iterrows():
        fixed = base.reasons.get(name, "").startswith("not quantizable") or not row[f"supported:{tier}"]
        if fixed or name in kept:
            choices[name] = KEEP
            reasons[name] = base.reasons[name] if fixed or base.choices.get(name) == KEEP else reason
        else:
            choices[name] = tier
            reasons[name] = base.reasons[name] if base.choices.get(name) == tier else reason
    other = int(table.meta.get("other_bytes", 0))
    return _assemble(table, model, choices, reasons, base.budget["spec"], base.budget["bytes"], base.objective,
                     base.tiers, _all_4bit_bytes(model, tier, other), other + int(model["bytes_16bit"].sum()),
                     base.vllm_safe)


def _candidates(table: SensitivityTable, tiers: list[str], objective: str) -> pd.DataFrame:
    """One row per Linear with columns ``bytes:<tier>``, ``score:<tier>`` and identity."""
    linear = table.df[table.df["kind"] == "Linear"]
    if linear.empty:
        raise ValueError("the sensitivity table holds no Linear module: nothing to plan")
    base = linear.drop_duplicates("name").set_index("name")[
        ["group", "layer", "module_type", "params", "bytes_16bit", "quantizable", "reason"]].copy()
    for tier in tiers:
        rows = linear[linear["format"] == tier].set_index("name")
        base[f"supported:{tier}"] = rows["supported"] & base["quantizable"]
        base[f"bytes:{tier}"] = rows["bytes"]
        base[f"footprint:{tier}"] = rows["footprint_bytes"]
        base[f"score:{tier}"] = scores(rows, objective, table)
    return base


def _items(model, tiers, fixed, pinned_quant, vllm_safe, whole_blocks):
    """Solver items (option lists) and, for each, the module names it decides together."""
    free = [n for n in model.index if n not in fixed]
    groups = fused_groups(free, whole_blocks) if vllm_safe or whole_blocks else [[n] for n in free]
    items, members = [], []
    for names in groups:
        options = []
        for tier in tiers:
            if all(model.loc[n, f"supported:{tier}"] for n in names):
                options.append(Option(tier, int(sum(model.loc[n, f"bytes:{tier}"] for n in names)),
                                      float(sum(model.loc[n, f"score:{tier}"] for n in names))))
        if not any(n in pinned_quant for n in names) or not options:
            options.append(Option(KEEP, int(sum(model.loc[n, "bytes_16bit"] for n in names)), 0.0))
        items.append(options)
        members.append(names)
    return items, members


def _all_4bit_bytes(model, tier, other) -> int:
    """Bytes of the plain bitsandbytes load: every supported module in ``tier``, lm_head 16-bit."""
    four = model[f"supported:{tier}"] & (model["group"] != "lm_head")
    return int(other + model.loc[four, f"bytes:{tier}"].sum() + model.loc[~four, "bytes_16bit"].sum())


def _four_bit_formats(table) -> list[str]:
    four = [f["name"] for f in table.meta.get("formats", []) if f.get("bits") == 4]
    if not four:
        raise ValueError("the sensitivity table measured no 4-bit format: re-run analyze with --formats nf4")
    return four


def _measured_reason(row, label, pin, item) -> str:
    shared = f" (decided with {len(item) - 1} other module(s) of its fused set/block)" if len(item) > 1 else ""
    if pin:
        return f"pinned: --quantize {pin}{shared}"
    if label == KEEP:
        return f"measured: kept 16-bit{shared}"
    return f"measured: {label}{shared}"


def _assemble(table, model, choices, reasons, spec, capacity, objective, tiers, all_4bit, ceiling,
              vllm_safe) -> Plan:
    other = int(table.meta.get("other_bytes", 0))
    other_fp = int(table.meta.get("other_footprint_bytes", 0))
    size = other + sum(model.loc[n, "bytes_16bit"] if c == KEEP else model.loc[n, f"bytes:{c}"]
                       for n, c in choices.items())
    footprint = other_fp + sum(model.loc[n, "bytes_16bit"] if c == KEEP else model.loc[n, f"footprint:{c}"]
                               for n, c in choices.items())
    error = sum(0.0 if c == KEEP else model.loc[n, f"score:{c}"] for n, c in choices.items())
    error_all_4bit = float(model.loc[model[f"supported:{tiers[0]}"] & (model["group"] != "lm_head"),
                                     f"score:{tiers[0]}"].sum())
    kept = [n for n, c in choices.items() if c == KEEP]
    quantized = [n for n, c in choices.items() if c != KEEP]
    return Plan(
        choices=choices, reasons=reasons, skip_modules=build_skip_list(kept, quantized),
        budget={"spec": str(spec), "bytes": int(capacity)}, objective=objective, tiers=tiers,
        vllm_safe=vllm_safe,
        predicted={"bytes": int(size), "footprint_bytes": int(footprint), "error": float(error),
                   "bytes_all_4bit": int(all_4bit), "error_all_4bit": error_all_4bit,
                   "bytes_16bit": int(ceiling), "over_all_4bit": size / all_4bit - 1},
        table_hash=table.content_hash, model_id=table.meta.get("model_id", ""),
        model_fingerprint=table.meta.get("model_fingerprint", ""),
        quant=next(f for f in table.meta["formats"] if f["name"] == tiers[0]) if tiers else {},
    )
