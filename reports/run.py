"""compare_and_report(): the comparison and the report in one call, as ``quantplan compare`` and ``run`` use them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from quantplan.analysis.models import ModelSource
from quantplan.analysis.table import SensitivityTable
from quantplan.common.profile import stage
from quantplan.planner.plan_types import Plan

from .compare import CompareConfig, compare
from .report import write_report


def compare_and_report(model: str | ModelSource | None, table: SensitivityTable | str | Path | None, plans,
                       out_dir: str | Path, *, pareto: pd.DataFrame | str | Path | None = None,
                       options: CompareConfig | None = None, model16=None, checkpoint: str | Path | None = None,
                       packed=None, **option_overrides) -> dict[str, Path]:
    """Measure the variants (:func:`~reports.compare.compare`) and write the report into ``out_dir``.

    ``plans`` are Plan objects or plan.json paths; ``table`` a SensitivityTable or its folder
    (None: the folder of the first plan path). ``pareto`` is a DataFrame, a ``pareto.csv``
    path (ignored when missing) or None (computed from the table). ``option_overrides`` set
    fields of :class:`CompareConfig` (e.g. ``device="cuda"``, ``samples=16``). ``model16``: the 16-bit model
    already loaded in ``options.dtype`` on ``options.device`` (a run's), instead of loading it again, and
    ``packed`` its packed 4-bit weights made before (:class:`~analysis.packed.PackedWeights`);
    ``checkpoint``: the first plan's exported checkpoint, measured block by block under ``options.max_memory``.
    """
    if "device" in option_overrides:  # a dtype chosen for the former device ("auto") is chosen again
        option_overrides.setdefault("dtype", "auto")
    options = replace(options or CompareConfig(), **option_overrides)
    if table is None:
        first = next((Path(p) for p in plans if not isinstance(p, Plan)), None)
        table = (first if first is not None and first.is_dir() else first.parent) if first is not None else None
    if not isinstance(table, SensitivityTable):
        if table is None:
            raise FileNotFoundError("compare needs the sensitivity table the plans came from: pass --table DIR")
        table = SensitivityTable.load(table)
    plans = [p if isinstance(p, Plan) else Plan.load(p) for p in plans]
    with stage("compare"):
        comparison = compare(model, plans, out_dir, table=table, options=options, model16=model16,
                             checkpoint=checkpoint, packed=packed)
    if isinstance(pareto, str | Path):
        pareto = pd.read_csv(pareto) if Path(pareto).is_file() else None
    with stage("write report"):
        paths = write_report(out_dir, table, plans, comparison, pareto)
    if options.progress:
        print(comparison.scoreboard_markdown())
        print(f"quantplan: wrote {paths['html']}, {paths['md']} and {Path(out_dir) / 'scoreboard.csv'}")
    return {"scoreboard": Path(out_dir) / "scoreboard.csv", **paths}
