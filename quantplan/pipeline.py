"""The main job, as functions: analyze (or reuse a table) -> plan -> pareto -> export -> summary.

``quantplan run`` and ``quantplan analyze`` are thin wrappers around these; notebooks call
them directly.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from quantplan.analysis import analyze, load_model, load_processor, parse_formats, resolve_source
from quantplan.analysis.distributed import init_from_environment, is_main_process
from quantplan.analysis.models import ModelSource, dtype_from_name
from quantplan.analysis.summary import summarize
from quantplan.analysis.table import META_FILE, TABLE_FILE, SensitivityTable, TableMismatch
from quantplan.analysis.vision import calibration_for_model
from quantplan.planner.budget import format_bytes
from quantplan.planner.export import check_out_dir, export
from quantplan.planner.pareto import pareto_curve
from quantplan.planner.plan import plan
from quantplan.planner.priors import kept_summary, rule_priors


@dataclass
class AnalyzeOptions:
    """What ``analyze`` needs besides the model: calibration and formats."""

    calib: str | None = None
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    formats: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    device: str = "cpu"
    dtype: str = "bf16"
    batch_size: int = 4
    resume: bool = False
    progress: bool = True
    fisher: bool = True
    images: str | None = None  # vision-language models: folder, file, or "default" (shipped photos)
    prompt: str | None = None
    text_only: bool = False
    max_memory: str | None = None  # stream the model block by block under this cap (analysis.streaming)
    context: bool = False  # quantized-context pass: restore_gain, context_output_rel_error (objective "restore")


def calibration_of(source: ModelSource, options: AnalyzeOptions):
    """The calibration set ``options`` describe for this model (text, or images + prompts for a VLM)."""
    from transformers import AutoConfig

    return calibration_for_model(
        AutoConfig.from_pretrained(source.path), load_processor(source), images=options.images,
        prompt=options.prompt, text_only=options.text_only, calib=options.calib, samples=options.samples,
        seq_len=options.seq_len, seed=options.seed)


@dataclass
class EndToEnd:
    """Planning steps that run the model (``quantplan run``): refinement rounds and the verification.

    ``refine`` rounds of measured KL gradients (:mod:`planner.refine`, opt-in), then the
    never-worse-than-all-4-bit check (:mod:`planner.verify`, on by default), both on the first
    ``max_batches`` calibration batches (default: all of them).
    """

    source: ModelSource
    options: AnalyzeOptions
    refine: int = 0
    verify: bool = True
    max_batches: int | None = None

    def plan(self, table: SensitivityTable, budget, **plan_options):
        """plan() (or refine()) then verify(), sharing one model, one 16-bit reference and one 4-bit cache."""
        if not (self.refine or self.verify):
            return plan(table, budget, **plan_options)
        from quantplan.analysis.endtoend import KLReference
        from quantplan.analysis.formats import format_from_dict
        from quantplan.analysis.simulate import QuantCache
        from quantplan.planner.refine import refine
        from quantplan.planner.verify import verify

        chosen = plan(table, budget, **plan_options)  # fails fast on a bad budget before loading the model
        model = load_model(self.source, dtype=dtype_from_name(self.options.dtype), device=self.options.device)
        calibration = calibration_of(self.source, self.options)
        reference = KLReference(model, calibration, self.options.batch_size, self.max_batches,
                                progress=self.options.progress)
        cache = QuantCache(model, format_from_dict(chosen.quant))
        shared = {"reference": reference, "cache": cache, "progress": self.options.progress}
        if self.refine:
            chosen = refine(table, budget, model, calibration, rounds=self.refine, **shared, **plan_options)
        if self.verify:
            chosen = verify(table, chosen, model, calibration, **shared)
        del model, reference, cache
        gc.collect()
        return chosen


def analyze_model(source: ModelSource, out_dir: str | Path, options: AnalyzeOptions, *,
                  reuse: bool = False) -> SensitivityTable:
    """Measure a model (or reuse the matching table already in ``out_dir``)."""

    formats = parse_formats(options.formats, options.blocksize, options.double_quant)
    dtype = dtype_from_name(options.dtype)
    calibration = calibration_of(source, options)
    out_dir = Path(out_dir)
    fisher = options.fisher and not options.max_memory
    if options.fisher and options.max_memory:
        print("quantplan: --max-memory streams the model one block at a time, without the backward pass that "
              "Fisher scores need: the table has output errors, and plans use them")
    if reuse and (out_dir / TABLE_FILE).is_file() and (out_dir / META_FILE).is_file():
        table = SensitivityTable.load(out_dir)
        try:
            table.check_matches(source.fingerprint, calibration.fingerprint, [f.name for f in formats])
            if fisher and not table.meta.get("fisher"):
                raise TableMismatch("the saved table has no Fisher scores")
            if options.context and not table.meta.get("context"):
                raise TableMismatch("the saved table has no quantized-context scores")
            print(f"quantplan: reusing the matching sensitivity table in {out_dir}")
            return table
        except TableMismatch as err:
            print(f"quantplan: not reusing {out_dir / TABLE_FILE}: {err}")
    if options.max_memory:
        table = _analyze_streaming(source, calibration, formats, dtype, out_dir, options)
    else:
        init_from_environment(options.device)  # torchrun / accelerate launch: share the batches
        model = load_model(source, dtype=dtype, device=options.device)
        table = analyze(model, calibration, formats, model_id=source.model_id, model_fingerprint=source.fingerprint,
                        batch_size=options.batch_size, out_dir=out_dir, resume=options.resume,
                        progress=options.progress, fisher=fisher, context=options.context)
        del model
        gc.collect()
    print(summarize(table))
    return table


def _analyze_streaming(source, calibration, formats, dtype, out_dir, options) -> SensitivityTable:
    from quantplan.analysis.streaming import analyze_streaming

    if options.device != "cpu":
        raise ValueError("--max-memory streams blocks through the CPU: drop --device, or drop --max-memory")
    if options.context:
        raise ValueError("--context runs the whole all-4-bit model, which --max-memory avoids: drop one of them")
    return analyze_streaming(source.path, calibration, formats, max_memory=options.max_memory, dtype=dtype,
                             model_id=source.model_id, model_fingerprint=source.fingerprint,
                             batch_size=options.batch_size, out_dir=out_dir, resume=options.resume,
                             progress=options.progress)


def run(model_spec: str | None = None, budget: str = "+10%", out_dir: str | Path | None = None,
        options: AnalyzeOptions | None = None, overwrite: bool = False, priors: str = "all",
        compare=None, refine: int = 0, verify: bool = True, max_batches: int | None = None,
        **plan_options) -> dict:
    """analyze -> plan -> pareto.csv -> export to ``out_dir/checkpoint`` (-> compare + report); returns paths.

    ``priors`` names the rules that keep modules 16-bit without measuring (see
    :mod:`planner.priors`: ``all``, ``none`` or a comma list). ``compare`` (a
    :class:`reports.compare.CompareOptions`) also measures the fidelity scoreboard and writes
    ``report.html``/``report.md`` into ``out_dir``. ``refine``/``verify``/``max_batches``: see
    :class:`EndToEnd`.
    """
    options = options or AnalyzeOptions()
    source = resolve_source(model_spec)
    out_dir = Path(out_dir or f"./{source.short_name}-dynamic-bnb-4bit")
    checkpoint = out_dir / "checkpoint"
    check_out_dir(checkpoint, overwrite)  # before the analysis: the rule export applies, refused early
    table = analyze_model(source, out_dir, options, reuse=True)
    if not is_main_process():
        return {"out": out_dir, "table": out_dir / TABLE_FILE}  # rank 0 plans, exports and reports
    if options.max_memory and refine:
        raise ValueError("--refine runs the whole model, which --max-memory avoids: drop one of them")
    if options.max_memory and verify:
        print("quantplan: --max-memory: skipping the end-to-end check (it runs the whole 16-bit model); "
              "the plan is not verified against all-4-bit")
        verify = False
    end_to_end = EndToEnd(source, options, refine, verify, max_batches)
    chosen = plan_and_save(table, budget, out_dir, priors, end_to_end=end_to_end, **plan_options)
    result = export(source, chosen, checkpoint, overwrite=overwrite, device=options.device,
                    compute_dtype=dtype_from_name(options.dtype if options.dtype != "fp32" else "bf16"))
    gap = result.footprint_bytes / chosen.predicted["footprint_bytes"] - 1
    print(f"quantplan: wrote {checkpoint} — get_memory_footprint() {format_bytes(result.footprint_bytes)} "
          f"(predicted {format_bytes(chosen.predicted['footprint_bytes'])}, {gap:+.2%}); "
          f"checkpoint tensors {format_bytes(result.checkpoint_bytes)}; "
          f"{result.kept} modules 16-bit, {result.quantized} 4-bit")
    reports = {}
    if compare is not None:
        from quantplan.reports.run import compare_and_report

        reports = compare_and_report(source, table, [chosen], out_dir, pareto=out_dir / "pareto.csv", options=compare)
    return {**reports, "out": out_dir, "table": out_dir / TABLE_FILE, "plan": out_dir / "plan.json",
            "pareto": out_dir / "pareto.csv", "checkpoint": checkpoint, "export": result, "plan_obj": chosen}


def plan_and_save(table: SensitivityTable, budget, out_dir: str | Path, priors: str = "all",
                  end_to_end: EndToEnd | None = None, **plan_options):
    """Plan under ``budget`` (with the rule priors; refined and verified by ``end_to_end`` if given),
    write plan.json and pareto.csv, print a summary."""
    out_dir = Path(out_dir)
    plan_options = {**plan_options, "priors": rule_priors(table, priors)}
    chosen = end_to_end.plan(table, budget, **plan_options) if end_to_end else plan(table, budget, **plan_options)
    chosen.save(out_dir / "plan.json")
    pareto_curve(table, **plan_options).to_csv(out_dir / "pareto.csv", index=False)
    print(plan_summary(chosen))
    print(kept_summary(chosen))
    return chosen


def plan_summary(p) -> str:
    """A few lines describing a plan."""
    pr = p.predicted
    return (f"plan: budget {p.budget['spec']} = {format_bytes(p.budget['bytes'])}; predicted "
            f"{format_bytes(pr['bytes'])} ({pr['over_all_4bit']:+.1%} over all-4-bit {format_bytes(pr['bytes_all_4bit'])}, "
            f"16-bit {format_bytes(pr['bytes_16bit'])}); {len(p.kept)} modules kept 16-bit; predicted error "
            f"{pr['error']:.4g} vs all-4-bit {pr['error_all_4bit']:.4g}")

