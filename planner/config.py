"""PlanConfig: how to plan (objective, tiers, pins, priors, fused groups), as one frozen value.

The budget is not part of it: it is the plan verb's own argument, and the Pareto sweep and
the refinement rounds plan one configuration at many budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantplan.analysis.table import SensitivityTable

from .plan import plan
from .plan_types import Plan
from .priors import parse_rules, rule_priors


@dataclass(frozen=True)
class PlanConfig:
    """Everything ``plan`` takes besides the table and the budget."""

    objective: str = "auto"  # auto | fisher | restore | output | weight | combined
    tiers: tuple[str, ...] | None = None  # formats besides 16-bit (default: the table's 4-bit menu, blocksize 64 first)
    keep: tuple[str, ...] = ()  # patterns always kept 16-bit
    quantize: tuple[str, ...] = ()  # patterns never kept 16-bit
    vllm_safe: bool = False  # q/k/v and gate/up share a format
    whole_blocks: bool = False  # all Linears of a block share a format
    priors: str = "all"  # rule priors: all | none | comma list (planner.priors)

    def __post_init__(self):
        parse_rules(self.priors)  # an unknown rule fails here, before any model is loaded

    def plan(self, table: SensitivityTable, budget, *, scores: dict[str, float] | None = None,
             decided: dict | None = None) -> Plan:
        """:func:`planner.plan.plan` of ``table`` under ``budget`` with this configuration."""
        return plan(table, budget, objective=self.objective, tiers=list(self.tiers) if self.tiers else None,
                    keep=list(self.keep), quantize=list(self.quantize), vllm_safe=self.vllm_safe,
                    whole_blocks=self.whole_blocks, priors=rule_priors(table, self.priors), scores=scores,
                    decided=decided)
