"""PlanConfig: how to plan (objective, tiers, pins, priors, fused groups), as one frozen value.

The budget is not part of it: it is the plan verb's own argument, and the Pareto sweep and
the refinement rounds plan one configuration at many budgets. With ``kv_context`` the budget is
a device budget: :meth:`PlanConfig.plan` subtracts the KV cache and activations
(:mod:`planner.kv_cache`) and plans the weights under the rest; :meth:`weights_only` is the
same configuration for a budget that is already the weights' (the sweep and the rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from quantplan.analysis.table import SensitivityTable
from quantplan.common.sizes import format_bytes

from .budget import BudgetError
from .kv_cache import attention_of, device_budget
from .plan import plan
from .plan_types import Plan, PlanBudget
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
    kv_context: int | None = None  # tokens of KV cache the device budget holds (None: the budget is the weights')
    kv_batch: int = 1  # sequences of kv_context tokens

    def __post_init__(self):
        parse_rules(self.priors)  # an unknown rule fails here, before any model is loaded
        if self.kv_context is not None and self.kv_context < 1:
            raise ValueError(f"--kv-context {self.kv_context}: give the context length in tokens (at least 1)")
        if self.kv_batch < 1:
            raise ValueError(f"--kv-batch {self.kv_batch}: give the number of sequences (at least 1)")

    def weights_only(self) -> PlanConfig:
        """This configuration for a budget that is already the weights' share (no KV cache subtracted)."""
        return replace(self, kv_context=None)

    def plan(self, table: SensitivityTable, budget, *, scores: dict[str, dict[str, float]] | None = None,
             decided: dict | None = None) -> Plan:
        """:func:`planner.plan.plan` of ``table`` under ``budget`` with this configuration (``budget`` is a
        device budget, split by :func:`planner.kv_cache.device_budget`, when ``kv_context`` is set)."""
        if self.kv_context is not None:
            return self._plan_device(table, budget, scores=scores, decided=decided)
        return plan(table, budget, objective=self.objective, tiers=list(self.tiers) if self.tiers else None,
                    keep=list(self.keep), quantize=list(self.quantize), vllm_safe=self.vllm_safe,
                    whole_blocks=self.whole_blocks, priors=rule_priors(table, self.priors), scores=scores,
                    decided=decided)

    def problem(self, table: SensitivityTable):
        """The knapsack this configuration plans with on ``table`` (:class:`planner.plan.PlanProblem`), for
        solving at many weight budgets (the Pareto sweep)."""
        from .plan import PlanProblem

        return PlanProblem.build(table, objective=self.objective, tiers=list(self.tiers) if self.tiers else None,
                                 keep=list(self.keep), quantize=list(self.quantize), vllm_safe=self.vllm_safe,
                                 whole_blocks=self.whole_blocks, priors=rule_priors(table, self.priors))

    def _plan_device(self, table, budget, **kwargs) -> Plan:
        split = device_budget(attention_of(table), budget, self.kv_context, self.kv_batch)
        try:
            weights = self.weights_only().plan(table, split.weights_bytes, **kwargs)
        except BudgetError as err:
            raise BudgetError(f"device budget {split.spec} = {format_bytes(split.bytes)} minus the KV cache "
                              f"{format_bytes(split.kv_cache_bytes)} ({split.batch} x {split.context} tokens) and "
                              f"activations {format_bytes(split.activation_bytes)} leaves "
                              f"{format_bytes(split.weights_bytes)} for the weights: {err}") from None
        return replace(weights, budget=PlanBudget(f"{split.spec} - KV - activations", split.weights_bytes),
                       device=split)
