"""Rule priors: modules kept 16-bit because a known rule says so, not because this run measured it.

Two rules come from the dynamic 4-bit checkpoints published for vision-language models:

- ``projector``: the projector / merger between vision tower and language model stays 16-bit.
  Every image token passes through it, it is a tiny share of the bytes, and its error lands
  directly in the language model's input embeddings.
- ``mllama_cross_attn_o_proj``: Mllama's cross-attention ``o_proj`` stays 16-bit. It writes the
  image signal into the text residual stream, and its gate scales whatever error it carries.

Each rule is a function ``table -> {module: "prior: <why>"}``; :func:`rule_priors` joins the
rules a user switched on, and ``plan(table, priors=...)`` pins those modules 16-bit with that
reason. A ``--quantize`` pattern overrides a prior; ``--keep`` and "not quantizable" come first.
:func:`kept_by` sorts a plan's 16-bit modules into rule, measurement, pin and the rest, for
reports.
"""

from __future__ import annotations

from quantplan.analysis.table import SensitivityTable

from .plan_types import Plan

PREFIX = "prior: "


def projector_prior(table: SensitivityTable) -> dict[str, str]:
    """Every quantizable Linear of the projector / merger group."""
    return {name: PREFIX + "projector/merger kept 16-bit (every image token passes through it; small)"
            for name in _linears(table, lambda row: row["group"] == "projector")}


def mllama_cross_attention_prior(table: SensitivityTable) -> dict[str, str]:
    """Mllama's cross-attention output projections (nothing for other model types)."""
    if table.meta.get("model_type") != "mllama":
        return {}
    return {name: PREFIX + "Mllama cross-attention o_proj kept 16-bit (writes the image signal into the text stream)"
            for name in _linears(table, lambda row: row["group"] == "cross_attention"
                                 and row["module_type"] == "o_proj")}


RULES = {"projector": projector_prior, "mllama_cross_attn_o_proj": mllama_cross_attention_prior}


def rule_priors(table: SensitivityTable, rules: str | list[str] | None = "all") -> dict[str, str]:
    """``{module: "prior: ..."}`` for the rules switched on: ``"all"``, ``"none"``/None, or rule names."""
    names = parse_rules(rules)
    priors: dict[str, str] = {}
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


def kept_by(plan: Plan) -> dict[str, list[str]]:
    """The plan's 16-bit modules by why: ``rule``, ``measurement``, ``pin``, ``not quantizable``, ``lm_head``."""
    kinds = {"rule": [], "measurement": [], "pin": [], "not quantizable": [], "lm_head": []}
    for name in plan.kept:
        reason = plan.reasons.get(name, "")
        if reason.startswith(PREFIX):
            kinds["rule"].append(name)
        elif reason.startswith("measured"):
            kinds["measurement"].append(name)
        elif reason.startswith("pinned"):
            kinds["pin"].append(name)
        elif reason.startswith("not quantizable"):
            kinds["not quantizable"].append(name)
        else:
            kinds["lm_head"].append(name)
    return kinds


def kept_summary(plan: Plan, limit: int = 6) -> str:
    """Lines for a report: how many modules each reason kept 16-bit, with the first few names."""
    lines = []
    for kind, names in kept_by(plan).items():
        if names:
            more = f", … (+{len(names) - limit})" if len(names) > limit else ""
            lines.append(f"kept 16-bit by {kind}: {len(names)} — " + ", ".join(names[:limit]) + more)
    return "\n".join(lines) or "no module kept 16-bit"


def _linears(table: SensitivityTable, keep) -> list[str]:
    rows = table.modules()
    rows = rows[(rows["kind"] == "Linear") & rows["quantizable"]]
    return [row["name"] for _, row in rows.iterrows() if keep(row)]
