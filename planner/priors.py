"""Rule priors: modules kept 16-bit because a known rule says so, not because this run measured it.

Two rules come from the dynamic 4-bit checkpoints published for vision-language models:

- ``projector``: the projector / merger between vision tower and language model stays 16-bit.
  Every image token passes through it, it is a tiny share of the bytes, and its error lands
  directly in the language model's input embeddings.
- ``mllama_cross_attn_o_proj``: Mllama's cross-attention ``o_proj`` stays 16-bit. It writes the
  image signal into the text residual stream, and its gate scales whatever error it carries.

Each rule is a function ``table -> {module: Reason(PRIOR, why)}``; :func:`rule_priors` joins the
rules a user switched on, and ``plan(table, priors=...)`` pins those modules 16-bit with that
reason. A ``--quantize`` pattern overrides a prior; ``--keep`` and "not quantizable" come first.
:func:`kept_by` sorts a plan's 16-bit modules by the kind of their reason, for reports.
"""

from __future__ import annotations

from quantplan.analysis.table import SensitivityTable

from .plan_types import Plan
from .reasons import LABELS, Reason, ReasonKind


def projector_prior(table: SensitivityTable) -> dict[str, Reason]:
    """Every quantizable Linear of the projector / merger group."""
    why = Reason(ReasonKind.PRIOR, "projector/merger kept 16-bit (every image token passes through it; small)")
    return {name: why for name in _linears(table, lambda row: row["group"] == "projector")}


def mllama_cross_attention_prior(table: SensitivityTable) -> dict[str, Reason]:
    """Mllama's cross-attention output projections (nothing for other model types)."""
    if table.meta.get("model_type") != "mllama":
        return {}
    why = Reason(ReasonKind.PRIOR,
                 "Mllama cross-attention o_proj kept 16-bit (writes the image signal into the text stream)")
    return {name: why for name in _linears(table, lambda row: row["group"] == "cross_attention"
                                           and row["module_type"] == "o_proj")}


RULES = {"projector": projector_prior, "mllama_cross_attn_o_proj": mllama_cross_attention_prior}


def rule_priors(table: SensitivityTable, rules: str | list[str] | None = "all") -> dict[str, Reason]:
    """``{module: Reason(PRIOR, why)}`` for the rules switched on: ``"all"``, ``"none"``/None, or rule names."""
    names = parse_rules(rules)
    priors: dict[str, Reason] = {}
    for name in names:
        for module, reason in RULES[name](table).items():
            priors.setdefault(module, reason)
    return priors


def parse_rules(rules: str | list[str] | None) -> list[str]:
    """Rule names from ``"all"``, ``"none"``, a comma list or a list; an error names the choices."""
    if rules is None or rules == "none" or rules == []:
        return []
    if rules == "all":
        return list(RULES)
    names = [r.strip() for r in (rules.split(",") if isinstance(rules, str) else rules) if r.strip()]
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"unknown prior rule(s) {unknown}: choose from {', '.join(RULES)}, 'all' or 'none'")
    return names


def kept_by(plan: Plan) -> dict[ReasonKind, list[str]]:
    """The plan's 16-bit modules by the kind of their reason (every kind, in report order; a module without
    a reason is refused: every plan gives each module one)."""
    kinds: dict[ReasonKind, list[str]] = {kind: [] for kind in LABELS}
    for name in plan.kept:
        kinds[plan.reasons[name].kind].append(name)
    return kinds


def kept_summary(plan: Plan, limit: int = 6) -> str:
    """Lines for a report: how many modules each kind of reason kept 16-bit, with the first few names."""
    lines = []
    for kind, names in kept_by(plan).items():
        if names:
            more = f", … (+{len(names) - limit})" if len(names) > limit else ""
            lines.append(f"kept 16-bit by {LABELS[kind]}: {len(names)} — " + ", ".join(names[:limit]) + more)
    return "\n".join(lines) or "no module kept 16-bit"


def _linears(table: SensitivityTable, keep) -> list[str]:
    rows = table.modules()
    rows = rows[(rows["kind"] == "Linear") & rows["quantizable"]]
    return [row["name"] for _, row in rows.iterrows() if keep(row)]
