"""Loader compatibility of a plan: vLLM-safe or not, the skip list in the checkpoint's names, --vllm-safe's cost.

vLLM fuses q/k/v and gate/up (:mod:`planner.groups`) and fails with a shape assertion when a fused
set is split between 16-bit and 4-bit (vllm#12180). It reads the names the checkpoint saves, which
for a VLM differ from transformers 5's live names (:mod:`analysis.checkpoint_names`; the table's
``meta["checkpoint_prefixes"]``). The cost of ``--vllm-safe`` is shown at equal bytes: the table is
planned at the plan's weight budget with the fused sets free and tied, no model run. A blocksize-menu
plan (no ``BitsAndBytesConfig`` expresses it) is shown beside skip-list-only mode at equal bytes: the
table planned with the reference format alone, also without a model run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from quantplan.analysis.checkpoint_names import to_checkpoint_name
from quantplan.common.sizes import format_bytes

from .groups import fused_groups
from .plan_types import KEEP, FusedAlternative, LoaderCompat, Plan, SkipListAlternative


def split_fused_sets(plan: Plan) -> list[tuple[str, ...]]:
    """The fused q/k/v and gate/up sets whose members the plan puts in different formats."""
    sets = fused_groups(list(plan.choices))
    return [tuple(s) for s in sets if len(s) > 1 and len({plan.choices[n] for n in s}) > 1]


def checkpoint_skip_modules(plan: Plan, prefixes: list[list[str]]) -> list[str]:
    """The plan's kept modules named as the checkpoint saves them (vLLM matches these as substrings)."""
    return [to_checkpoint_name(n, prefixes) for n in plan_kept_in_skip_order(plan)]


def plan_kept_in_skip_order(plan: Plan) -> list[str]:
    """The kept module names in the skip list's order (anchored regex entries read back as names)."""
    return [entry.removeprefix("^").removesuffix("$").replace("\\", "") for entry in plan.skip_modules]


def loader_compat(table, plan: Plan, config=None) -> LoaderCompat:
    """The plan's :class:`LoaderCompat`; with ``config`` (its PlanConfig) also the table planned at the plan's
    weight budget with and without ``--vllm-safe`` (``--whole-blocks`` plans get none: blocks are tied anyway)
    and, for a blocksize-menu plan, with its reference format only (skip-list-only mode)."""
    costs, skip_only = (), None
    if config is not None and not config.whole_blocks:
        costs = tuple(c for c in (_cost(table, plan, config, safe) for safe in (False, True)) if c is not None)
    if config is not None and plan.mixed_blocksizes:
        skip_only = _skip_list_only(table, plan, config)
    return LoaderCompat(vllm_safe=not split_fused_sets(plan), split_sets=tuple(split_fused_sets(plan)),
                        checkpoint_skip_modules=tuple(checkpoint_skip_modules(
                            plan, table.meta.get("checkpoint_prefixes", []))),
                        alternatives=costs, blocksizes={f["name"]: int(f["blocksize"]) for f in table.meta.get(
                            "formats", []) if f.get("bits") == 4 and f["name"] in plan.tiers},
                        skip_list_only=skip_only)


def _cost(table, plan: Plan, config, safe: bool) -> FusedAlternative | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = replace(config.weights_only(), vllm_safe=safe).plan(table, plan.budget.bytes)
    except ValueError:  # BudgetError included
        return None  # tied sets cannot fit these bytes, or a pin splits a set
    return FusedAlternative(vllm_safe=safe, bytes=other.predicted.bytes, error=other.predicted.error,
                            kept=len(other.kept))


def _skip_list_only(table, plan: Plan, config) -> SkipListAlternative | None:
    """The table planned at the plan's weight budget with the plan's reference format alone."""
    tier = plan.tiers[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = replace(config.weights_only(), tiers=(tier,)).plan(table, plan.budget.bytes)
    except ValueError:  # BudgetError included: pins or tied sets that only the menu fits
        return None
    return SkipListAlternative(tier=tier, bytes=other.predicted.bytes, error=other.predicted.error,
                               kept=len(other.kept))


# -- what the model card and the report say (both render these) -----------------------------------------

def vllm_sentence(plan: Plan) -> str:
    """Whether vLLM can load the checkpoint's fused layers, and which sets break it."""
    split = split_fused_sets(plan)
    if not split:
        return ("vLLM-safe: yes — no fused q/k/v or gate/up set is split between 16-bit and 4-bit"
                + (" (planned with `--vllm-safe`)." if plan.vllm_safe else "."))
    shown = "; ".join("/".join(n.rpartition(".")[2] for n in s) + f" of `{s[0].rpartition('.')[0]}`"
                      for s in split[:3])
    return (f"vLLM-safe: no — {len(split)} fused set(s) are split between 16-bit and 4-bit ({shown}"
            f"{'; …' if len(split) > 3 else ''}); vLLM fuses them and fails to load such a checkpoint. "
            + ("Pins, priors or modules bitsandbytes cannot take split them: pin whole sets with `--keep`."
               if plan.vllm_safe else "Plan with `--vllm-safe` to decide each set as one."))


def cost_note(plan: Plan) -> str:
    """What the cost table leaves out: a setting that cannot be planned at these bytes or with these pins."""
    if plan.compat is None or len(plan.compat.alternatives) != 1:
        return ""
    missing = "on" if not plan.compat.alternatives[0].vllm_safe else "off"
    return (f" With `--vllm-safe` {missing} the table cannot be planned at these bytes with these pins "
            "(a pin splits a fused set, or tied sets do not fit).")


def cost_rows(plan: Plan) -> list[dict]:
    """``--vllm-safe`` off and on at the plan's weight budget: predicted bytes, error, modules kept."""
    if plan.compat is None:
        return []
    return [{"--vllm-safe": "on" if a.vllm_safe else "off", "predicted bytes": a.bytes,
             "predicted error": f"{a.error:.4g}", "modules kept 16-bit": a.kept} for a in plan.compat.alternatives]


def skip_list_sentence(plan: Plan) -> str:
    """A menu plan beside skip-list-only mode at the same bytes (predicted); empty when not computed."""
    alt = plan.compat.skip_list_only if plan.compat else None
    if alt is None:
        return ""
    blocksize = plan.compat.blocksizes.get(alt.tier, "?")
    own = plan.predicted.error
    change = f"{own / alt.error - 1:+.1%}" if alt.error > 0 else "n/a"
    scaled = (", on its channel-scaled weights; `--formats` alone measures the source weights" if plan.equalized
              else "")
    return (f"**Skip-list-only mode at the same bytes** (predicted from the same table{scaled}, no model run): with "
            f"every 4-bit module in `{alt.tier}` (blocksize {blocksize}; `--formats {alt.tier}`, a "
            f"`BitsAndBytesConfig` you can paste) the plan keeps {alt.kept} modules 16-bit in "
            f"{format_bytes(alt.bytes)}, predicted error {alt.error:.4g}; this menu plan keeps {len(plan.kept)} "
            f"in {format_bytes(plan.predicted.bytes)}, predicted error {own:.4g} ({change} against skip-list-only).")


def name_rows(plan: Plan) -> list[dict] | None:
    """The skip list in both name spaces (transformers 5 live, checkpoint / vLLM); None when they are the same."""
    if plan.compat is None:
        return None
    live = plan_kept_in_skip_order(plan)
    saved = list(plan.compat.checkpoint_skip_modules)
    if live == saved:
        return None
    return [{"transformers 5 (live modules)": a, "checkpoint / vLLM": b} for a, b in zip(live, saved, strict=True)]


def format_rows(plan: Plan) -> list[dict]:
    """Per-module 4-bit format and blocksize when the plan uses more than one 4-bit tier (else empty)."""
    four = {c for c in plan.choices.values() if c not in (KEEP, "int8")}
    if len(four) < 2:
        return []
    blocksizes = plan.compat.blocksizes if plan.compat else {}
    return [{"module": n, "format": c, "blocksize": blocksizes.get(c, "?")} for n, c in plan.choices.items()
            if c in four]
