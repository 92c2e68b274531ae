"""quantplan.reports: fidelity scoreboard, plots and the HTML report (reads tables, plans, checkpoints).

Data flows one way: model + plans + sensitivity table -> :func:`reports.compare.compare` ->
:class:`Comparison` (scoreboard.csv, generations, predicted vs measured) -> :func:`write_report`
-> report.html / report.md. :func:`compare_and_report` does both. (The verb lives in its module,
``reports.compare.compare``, so the module name is not shadowed.)
"""

from quantplan.common.lazy import lazy_room

_PUBLIC = {
    "CompareConfig": "quantplan.reports.compare",
    "plot_input_outliers": "quantplan.reports.plots",
    "plot_layer_errors": "quantplan.reports.plots",
    "plot_pareto": "quantplan.reports.plots",
    "plot_weight_heatmap": "quantplan.reports.plots",
    "save_figure": "quantplan.reports.plots",
    "spike_table": "quantplan.reports.plots",
    "write_report": "quantplan.reports.report",
    "Comparison": "quantplan.reports.result",
    "compare_and_report": "quantplan.reports.run",
}

lazy_room(__name__, _PUBLIC)
