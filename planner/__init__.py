"""quantplan.planner: decide which modules stay 16-bit, and write the checkpoint.

Data flows one way: :class:`~analysis.SensitivityTable` -> :func:`plan` -> :class:`Plan` ->
:func:`export` -> checkpoint folder.
"""

from .budget import Budget, BudgetError, parse_budget
from .export import ExportError, ExportResult, bnb_config, export
from .pareto import pareto_curve
from .plan import plan
from .plan_types import KEEP, Plan

__all__ = ["Budget", "BudgetError", "parse_budget", "ExportError", "ExportResult", "bnb_config", "export",
           "pareto_curve", "plan", "KEEP", "Plan"]
