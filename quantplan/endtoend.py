"""EndToEnd: the planning steps that run the model (``quantplan run``): refinement rounds, verification.

``refine`` rounds of measured KL gradients (:mod:`planner.refine`, opt-in), then the
never-worse-than-all-4-bit check (:mod:`planner.verify`, on by default), both on the first
``max_batches`` calibration batches (default: all of them), sharing one loaded model, one
16-bit reference and one cache of 4-bit round trips. Under ``--max-memory`` the model is never
loaded whole: the verification's KLs are measured block by block from disk
(:class:`analysis.stream_variants.StreamedKLs`, the same numbers), and refinement is refused.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from quantplan.analysis.config import AnalyzeConfig, calibration_of
from quantplan.analysis.models import ModelSource, dtype_from_name, load_model
from quantplan.analysis.table import SensitivityTable
from quantplan.common.profile import stage
from quantplan.planner.config import PlanConfig
from quantplan.planner.plan_types import Plan


@dataclass(frozen=True)
class EndToEnd:
    """Which end-to-end steps run, and on how many calibration batches."""

    refine: int = 0  # rounds; 0 = off
    verify: bool = True
    max_batches: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.refine or self.verify)

    def plan(self, source: ModelSource, analyze: AnalyzeConfig, table: SensitivityTable, budget,
             config: PlanConfig) -> Plan:
        """``config.plan`` (or the refinement) then the verification, sharing one model and reference."""
        chosen = config.plan(table, budget)  # fails fast on a bad budget before loading the model
        if not self.active:
            return chosen
        from quantplan.analysis.formats import format_from_dict
        from quantplan.analysis.reference import KLReference
        from quantplan.analysis.simulate import QuantCache
        from quantplan.planner.refine import refine
        from quantplan.planner.verify import verify

        if analyze.max_memory:
            return self._verify_streamed(source, analyze, table, chosen)
        with stage("load model"):
            model = load_model(source, dtype=dtype_from_name(analyze.dtype), device=analyze.device)
        calibration = calibration_of(source, analyze)
        reference = KLReference(model, calibration, analyze.batch_size, self.max_batches, progress=analyze.progress)
        cache = QuantCache(model, format_from_dict(chosen.quant))
        shared = {"reference": reference, "cache": cache, "progress": analyze.progress}
        if self.refine:
            with stage("refinement"):
                chosen = refine(table, budget, model, calibration, config=config, rounds=self.refine, **shared)
        if self.verify:
            with stage("verification"):
                chosen = verify(table, chosen, model, calibration, **shared)
        del model, reference, cache
        gc.collect()
        return chosen

    def _verify_streamed(self, source: ModelSource, analyze: AnalyzeConfig, table: SensitivityTable,
                         chosen: Plan) -> Plan:
        """The verification under ``analyze.max_memory``: each variant's KL measured block by block from disk."""
        from quantplan.analysis.formats import format_from_dict
        from quantplan.analysis.stream_variants import StreamedKLs, StreamOptions
        from quantplan.planner.verify import verify

        if self.refine:
            raise ValueError("--refine runs the whole model, which --max-memory avoids: drop one of them")
        options = StreamOptions(dtype=dtype_from_name(analyze.dtype), batch_size=analyze.batch_size,
                                max_batches=self.max_batches, device=analyze.device, max_memory=analyze.max_memory,
                                progress=analyze.progress)
        measure = StreamedKLs(source.path, calibration_of(source, analyze), format_from_dict(chosen.quant), options)
        with stage("verification (streamed)"):
            return verify(table, chosen, measure=measure, progress=analyze.progress)
