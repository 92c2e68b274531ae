"""quantplan.planner: decide which modules stay 16-bit, and write the checkpoint.

Data flows one way: :class:`~analysis.SensitivityTable` -> :func:`plan` -> :class:`Plan` ->
:func:`export` -> checkpoint folder.
"""

if __name__ != "quantplan.planner":  # the folder is a room of the quantplan package, not a package of its own
    raise ImportError(f"{__name__} is not importable on its own: use `import quantplan.planner` "
                      "(`pip install .` installs the quantplan package)")

from quantplan.common.lazy import lazy_package

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

lazy_package(__name__, _PUBLIC)
