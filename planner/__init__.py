"""quantplan.planner: decide which modules stay 16-bit, and write the checkpoint.

Data flows one way: :class:`~analysis.SensitivityTable` -> :func:`plan` -> :class:`Plan` ->
:func:`export` -> checkpoint folder.
"""

from quantplan.common.lazy import lazy_room

_PUBLIC = {
    "Budget": "quantplan.planner.budget",
    "BudgetError": "quantplan.planner.budget",
    "parse_budget": "quantplan.planner.budget",
    "ExportError": "quantplan.planner.export",
    "ExportResult": "quantplan.planner.export",
    "bnb_config": "quantplan.planner.export",
    "export": "quantplan.planner.export",
    "pareto_curve": "quantplan.planner.pareto",
    "plan": "quantplan.planner.plan",
    "KEEP": "quantplan.planner.plan_types",
    "Plan": "quantplan.planner.plan_types",
}

lazy_room(__name__, _PUBLIC)
