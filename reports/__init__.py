"""quantplan.reports: fidelity scoreboard, plots and the HTML report (reads tables, plans, checkpoints).

Data flows one way: model + plans + sensitivity table -> :func:`reports.compare.compare` ->
:class:`Comparison` (scoreboard.csv, generations, predicted vs measured) -> :func:`write_report`
-> report.html / report.md. :func:`compare_and_report` does both. (The verb lives in its module,
``reports.compare.compare``, so the module name is not shadowed.)
"""

if __name__ != "quantplan.reports":  # the folder is a room of the quantplan package, not a package of its own
    raise ImportError(f"{__name__} is not importable on its own: use `import quantplan.reports` "
                      "(`pip install .` installs the quantplan package)")

from quantplan.common.lazy import lazy_package

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

lazy_package(__name__, _PUBLIC)
