"""Which Linears stay 16-bit in each compared variant, and what each variant weighs.

A variant is a :class:`KeepSet`: the Linear modules kept 16-bit (everything else quantizable
is quantized in the plan's 4-bit format, or, for a plan over a blocksize menu, in the format
``formats`` names) plus its predicted checkpoint and footprint bytes, counted by the planner's
own byte model (:mod:`planner.memory_model`).

Heuristic baselines spend the same bytes as a dynamic plan, chosen without measuring
outputs. Each takes modules in its own order and keeps every one that still fits in the
plan's predicted bytes (greedy fill, so a module too big to fit is passed over, not the end):

- ``first+last layers``: the Linears of each tower's first and last block, then the next
  blocks inwards (a common rule of thumb: the ends of the network are fragile);
- ``weight error``: largest relative weight error first (what a data-free tool can see);
- ``random``: a random order, one per seed (the scoreboard shows the mean of the seeds).

Modules the dynamic plan did not choose by measurement (not quantizable, lm_head, ``--keep``
pins, rule priors such as the VLM projector) are kept in every baseline, and ``--quantize``
pins are quantized, so all spend bytes under the same constraints and differ only in the
modules they pick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from quantplan.analysis.formats import INT8, FourBit, format_from_dict
from quantplan.analysis.table import SensitivityTable
from quantplan.planner.memory_model import ByteModel
from quantplan.planner.plan_types import KEEP, Plan
from quantplan.planner.reasons import FIXED_KINDS, ReasonKind

HEURISTICS = ("first+last layers", "weight error", "random")


@dataclass(frozen=True)
class KeepSet:
    """One compared variant as a set of 16-bit Linears, with its predicted bytes."""

    label: str  # scoreboard row name
    kind: str  # reference | uniform | dynamic | heuristic
    kept: frozenset[str]
    quantized: frozenset[str]
    bytes: int  # predicted checkpoint bytes (the planner's unit)
    footprint_bytes: int  # predicted get_memory_footprint()
    plan: str = ""  # budget spec of the dynamic plan this row belongs to
    seed: int | None = None
    formats: dict[str, FourBit] = field(default_factory=dict, hash=False)  # each quantized module's 4-bit format

    @property
    def mixed_formats(self) -> bool:
        """No BitsAndBytesConfig loads it: more than one 4-bit format (a blocksize-menu plan), or one at a
        blocksize other than transformers' 64 (a menu plan with every 4-bit module in ``nf4-bs32``)."""
        return len(set(self.formats.values())) > 1 or any(f.blocksize != 64 for f in self.formats.values())


def linear_frame(table: SensitivityTable, fmt: str) -> pd.DataFrame:
    """One row per Linear (index: name): identity, 16-bit and ``fmt`` bytes, errors, ``supported``."""
    model = ByteModel(table, [fmt])
    rows = table.for_format(fmt)
    rows = rows[rows["kind"] == "Linear"].set_index("name")
    frame = model.frame[["group", "bytes_16bit"]]
    frame = frame.assign(bytes=model.frame[f"bytes:{fmt}"], footprint_bytes=model.frame[f"footprint:{fmt}"],
                         supported=model.frame[f"supported:{fmt}"])
    return frame.join(rows[["layer", "module_type", "weight_rel_error", "output_rel_error"]])


def sized(model: ByteModel, label: str, kind: str, kept, plan: str = "", seed: int | None = None) -> KeepSet:
    """A KeepSet for ``kept`` (every other supported Linear quantized in the model's tier), with its bytes."""
    tier = model.tiers[0]
    supported = model.frame[f"supported:{tier}"]
    kept = frozenset(kept) | frozenset(model.frame.index[~supported])
    choices = {name: KEEP if name in kept else tier for name in model.frame.index}
    size = model.size(choices)
    quantized = frozenset(n for n, c in choices.items() if c != KEEP)
    fmt = model.formats.get(tier)
    formats = {n: fmt for n in quantized} if isinstance(fmt, FourBit) else {}
    return KeepSet(label, kind, kept, quantized, size.bytes, size.footprint_bytes, plan, seed, formats)


def sixteen_bit(table: SensitivityTable, fmt: str) -> KeepSet:
    model = ByteModel(table, [fmt])
    return sized(model, "16-bit", "reference", model.frame.index)


def all_4bit(table: SensitivityTable, fmt: str) -> KeepSet:
    """Every supported Linear in ``fmt`` except lm_head (transformers' default)."""
    model = ByteModel(table, [fmt])
    return sized(model, f"all-{fmt.upper()}", "uniform", model.frame.index[~model.all_4bit_mask(fmt)])


def all_int8(table: SensitivityTable) -> KeepSet:
    """bitsandbytes 8-bit on every Linear but lm_head (transformers' default), with its bytes."""
    modules = table.modules()
    linear = modules[modules["kind"] == "Linear"]
    size, footprint = int(table.meta.get("other_bytes", 0)), int(table.meta.get("other_footprint_bytes", 0))
    kept, quantized = set(), set()
    for _, row in linear.iterrows():
        shape = (int(row["out_features"]), int(row["in_features"]))
        if row["group"] == "lm_head":
            kept.add(row["name"])
            size, footprint = size + int(row["bytes_16bit"]), footprint + int(row["bytes_16bit"])
        else:
            quantized.add(row["name"])
            size, footprint = size + INT8.storage_bytes(shape), footprint + INT8.footprint_bytes(shape)
    return KeepSet("all-INT8 (bnb 8-bit)", "uniform", frozenset(kept), frozenset(quantized), size, footprint)


def plan_keep_set(table: SensitivityTable, plan: Plan) -> KeepSet:
    """The dynamic plan as a KeepSet (with each module's 4-bit format when the plan mixes blocksizes)."""
    kept = [n for n, c in plan.choices.items() if c == KEEP]
    label = f"dynamic {plan.budget.spec}"
    if not (plan.mixed_blocksizes and all(plan.format_of(t).get("bits") == 4 for t in plan.used_formats)):
        return sized(ByteModel(table, plan.tiers[:1]), label, "dynamic", kept, plan=plan.budget.spec)
    size = ByteModel(table, plan.tiers).size(plan.choices)
    formats = {n: format_from_dict(plan.format_of(c)) for n, c in plan.choices.items() if c != KEEP}
    quantized = frozenset(n for n, c in plan.choices.items() if c != KEEP)
    return KeepSet(label, "dynamic", frozenset(kept), quantized, size.bytes, size.footprint_bytes, plan.budget.spec,
                   formats=formats)


def baseline_keep_sets(table: SensitivityTable, plan: Plan, seeds=(0, 1, 2)) -> list[KeepSet]:
    """The heuristic baselines at the bytes of ``plan`` (see module docstring)."""
    fmt = plan.tiers[0]
    frame = linear_frame(table, fmt)
    model = ByteModel(table, [fmt])
    fixed = {n for n, r in plan.reasons.items() if r.kind in FIXED_KINDS} | set(frame.index[~frame["supported"]])
    forced = {n for n, r in plan.reasons.items() if r.kind is ReasonKind.PINNED_QUANTIZE}
    free = frame[~frame.index.isin(list(fixed | forced))]
    capacity = plan.predicted.bytes
    start = sized(model, "", "", fixed).bytes
    spec = plan.budget.spec
    orders = [("first+last layers", None, edge_order(free)),
              ("weight error", None, list(free.sort_values("weight_rel_error", ascending=False).index))]
    for seed in seeds:
        orders.append(("random", seed, list(np.random.default_rng(seed).permutation(list(free.index)))))
    sets = []
    for label, seed, order in orders:
        kept = greedy_fill(free, order, capacity - start)
        sets.append(sized(model, f"{label} @ {spec}", "heuristic", fixed | kept, spec, seed))
    return sets


def edge_order(free: pd.DataFrame) -> list[str]:
    """Modules ordered by their block's distance from the first or last block of its tower."""
    blocks = free[free["layer"] >= 0]
    first = blocks.groupby("group")["layer"].transform("min")
    last = blocks.groupby("group")["layer"].transform("max")
    distance = np.minimum(blocks["layer"] - first, last - blocks["layer"])
    ranked = blocks.assign(_d=distance, _pos=range(len(blocks))).sort_values(["_d", "layer", "_pos"])
    return list(ranked.index) + list(free.index[free["layer"] < 0])


def greedy_fill(free: pd.DataFrame, order, room: int) -> set[str]:
    """Keep modules in ``order`` while the extra 16-bit bytes still fit in ``room``."""
    kept, used = set(), 0
    for name in order:
        extra = int(free.loc[name, "bytes_16bit"] - free.loc[name, "bytes"])
        if used + extra <= room:
            kept.add(name)
            used += extra
    return kept
