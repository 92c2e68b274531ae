"""quantplan.reports: fidelity scoreboard, plots and the HTML report (reads tables, plans, checkpoints).

Data flows one way: model + plans + sensitivity table -> :func:`reports.compare.compare` ->
:class:`Comparison` (scoreboard.csv, generations, predicted vs measured) -> :func:`write_report`
-> report.html / report.md. :func:`compare_and_report` does both. (The verb lives in its module,
``reports.compare.compare``, so the module name is not shadowed.)
"""

from .compare import CompareOptions
from .plots import (
           plot_input_outliers,
           plot_layer_errors,
           plot_pareto,
           plot_weight_heatmap,
           save_figure,
           spike_table,
)
from .report import write_report
from .result import Comparison
from .run import compare_and_report

__all__ = ["CompareOptions", "Comparison", "write_report", "compare_and_report", "plot_input_outliers",
           "plot_layer_errors", "plot_pareto", "plot_weight_heatmap", "save_figure", "spike_table"]
