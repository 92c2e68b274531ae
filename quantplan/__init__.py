"""quantplan: measured, budgeted dynamic 4-bit quantization plans for Hugging Face models.

The public API on one screen (the names load lazily, so ``from quantplan import plan`` needs
pandas, not torch)::

    from quantplan import analyze, plan, export, compare, run

    source = resolve_source(None)                      # the offline default, or a hub id / folder
    model = load_model(source)
    data = load_calibration(load_processor(source))
    table = analyze(model, data, [NF4])                # -> SensitivityTable      (quantplan.analysis)
    p = plan(table, budget="+10%")                     # -> Plan                  (quantplan.planner)
    export(source, p, "out/checkpoint")                # -> ExportResult          (quantplan.planner)
    compare(source, table, [p])                        # -> Comparison            (quantplan.reports)
    run(None, "+10%", "out")                           # all of the above, as ``quantplan run`` does

Rooms: ``quantplan.analysis`` measures, ``quantplan.planner`` decides and writes,
``quantplan.reports`` reads and shows; the application layer (``quantplan.cli``,
``quantplan.pipeline``) alone composes all three. Data flows one way:
model -> probes -> table -> plan -> checkpoint -> report.
"""

from __future__ import annotations

from quantplan.common.lazy import lazy_package

#: public name -> the module that defines it
_PUBLIC = {
    # analysis: measure
    "analyze": "quantplan.analysis.analyze",
    "AnalyzeConfig": "quantplan.analysis.config",
    "SensitivityTable": "quantplan.analysis.table",
    "TableMismatch": "quantplan.analysis.table",
    "CalibrationSet": "quantplan.analysis.calibration",
    "load_calibration": "quantplan.analysis.calibration",
    "NF4": "quantplan.analysis.formats",
    "FP4": "quantplan.analysis.formats",
    "INT8": "quantplan.analysis.formats",
    "FourBit": "quantplan.analysis.formats",
    "parse_formats": "quantplan.analysis.formats",
    "ModelSource": "quantplan.analysis.models",
    "load_model": "quantplan.analysis.models",
    "load_processor": "quantplan.analysis.models",
    "resolve_source": "quantplan.analysis.models",
    "summarize": "quantplan.analysis.summary",
    # planner: decide and write
    "plan": "quantplan.planner.plan",
    "PlanConfig": "quantplan.planner.config",
    "Plan": "quantplan.planner.plan_types",
    "Budget": "quantplan.planner.budget",
    "BudgetError": "quantplan.planner.budget",
    "pareto_curve": "quantplan.planner.pareto",
    "export": "quantplan.planner.export",
    "ExportError": "quantplan.planner.export",
    "ExportResult": "quantplan.planner.export",
    # reports: read and show
    "compare": "quantplan.reports.compare",
    "CompareConfig": "quantplan.reports.compare",
    "Comparison": "quantplan.reports.result",
    "write_report": "quantplan.reports.report",
    "compare_and_report": "quantplan.reports.run",
    # the application layer
    "run": "quantplan.pipeline",
    "EndToEnd": "quantplan.endtoend",
    "plan_summary": "quantplan.pipeline",
}

lazy_package(__name__, _PUBLIC)
