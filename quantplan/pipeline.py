"""The main job, as functions: analyze (or reuse a table) -> plan -> pareto -> export -> compare + report.

``quantplan run``, ``analyze`` and ``plan`` are thin wrappers around these; notebooks call
them directly. This is the application layer: the one place that composes the three rooms.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

from quantplan.analysis import analyze, load_model, resolve_source
from quantplan.analysis.config import AnalyzeConfig, calibration_of
from quantplan.analysis.distributed import bind_local_gpu, init_from_environment, is_main_process
from quantplan.analysis.equalize import equalization_of
from quantplan.analysis.fisher_windows import backward_share
from quantplan.analysis.kept_hidden import KeptHidden
from quantplan.analysis.models import ModelSource, dtype_from_name
from quantplan.analysis.summary import summarize
from quantplan.analysis.table import META_FILE, TABLE_FILE, SensitivityTable, TableMismatch
from quantplan.common.collector import imports_frozen
from quantplan.common.profile import PROFILE_FILE, recording, stage
from quantplan.common.sizes import format_bytes, parse_size
from quantplan.planner.budget import BudgetError, parse_budget
from quantplan.planner.compat import loader_compat, vllm_sentence
from quantplan.planner.config import PlanConfig
from quantplan.planner.export import check_out_dir, export
from quantplan.planner.kv_cache import device_line
from quantplan.planner.pareto import pareto_curve
from quantplan.planner.plan_types import Plan
from quantplan.planner.priors import kept_summary

from .dry_run import check_streamed_run_fits, choose_max_memory, export_dtype
from .endtoend import EndToEnd
from .shared_model import SharedModel


def run(model_spec: str | None = None, budget: str = "+10%", out_dir: str | Path | None = None,
        analyze_config: AnalyzeConfig | None = None, *, plan_config: PlanConfig | None = None,
        compare=None, end_to_end: EndToEnd | None = None, overwrite: bool = False) -> dict:
    """analyze -> plan -> pareto.csv -> export to ``out_dir/checkpoint`` (-> compare + report); returns paths.

    ``compare`` (a :class:`reports.compare.CompareConfig`) also measures the fidelity
    scoreboard and writes ``report.html``/``report.md`` into ``out_dir``. ``end_to_end`` (default:
    verification on, refinement only where the verification finds 4-bit breaks the model badly)
    runs the plan through the model before export.
    A malformed budget, or one below the model's all-4-bit size, fails before the model is loaded.
    """
    analyze_config = analyze_config or AnalyzeConfig()
    plan_config = plan_config or PlanConfig()
    end_to_end = end_to_end or EndToEnd()
    parse_budget(budget)  # a malformed budget fails before anything is loaded
    source = resolve_source(model_spec)
    bind_local_gpu(analyze_config.device)  # before --max-memory auto reads a GPU's free memory
    analyze_config = choose_max_memory(source, analyze_config)
    out_dir = Path(out_dir or f"./{source.short_name}-dynamic-bnb-4bit")
    checkpoint = out_dir / "checkpoint"
    check_out_dir(checkpoint, overwrite)  # before the analysis: the rule export applies, refused early
    check_budget_fits(source, budget, analyze_config, plan_config)
    check_streamed_run_fits(source, analyze_config, verify=end_to_end.verify, compare=compare,
                            gradients=bool(end_to_end.refine))
    with imports_frozen(), recording() as profile:  # after bind_local_gpu: it must precede bitsandbytes' import
        result = _run_stages(source, budget, out_dir, analyze_config, plan_config, compare, end_to_end, overwrite)
    if "plan" in result:  # rank 0: the one that plans, exports and reports
        print("quantplan: stage profile (wall seconds, peak resident memory):")
        print("\n".join(profile.lines()))
        result["profile"] = profile.save(out_dir / PROFILE_FILE)
    return result


def _run_stages(source, budget, out_dir: Path, analyze_config: AnalyzeConfig, plan_config: PlanConfig, compare,
                end_to_end: EndToEnd, overwrite: bool) -> dict:
    """The steps of :func:`run` after its early checks, each a stage of the profile."""
    checkpoint = out_dir / "checkpoint"
    shared = None if analyze_config.max_memory else SharedModel(source, analyze_config.dtype, analyze_config.device,
                                                                 hidden=KeptHidden(verified_batches(end_to_end, analyze_config)))
    try:
        return _steps(source, budget, out_dir, checkpoint, analyze_config, plan_config, compare, end_to_end, overwrite,
                      shared)
    finally:
        if shared is not None:
            shared.release()


def _steps(source, budget, out_dir: Path, checkpoint: Path, analyze_config: AnalyzeConfig, plan_config: PlanConfig,
           compare, end_to_end: EndToEnd, overwrite: bool, shared: SharedModel | None) -> dict:
    """analysis, plan + verification, export, compare + report, with the 16-bit model loaded once (``shared``)."""
    with stage("analysis"):
        table = analyze_model(source, out_dir, analyze_config, reuse=True, shared=shared)
    if not is_main_process():
        return {"out": out_dir, "table": out_dir / TABLE_FILE}  # rank 0 plans, exports and reports
    with stage("plan + verification" if end_to_end.active else "plan"):
        chosen = plan_and_save(table, budget, out_dir, plan_config,
                               lambda: end_to_end.plan(source, analyze_config, table, budget, plan_config,
                                                       shared=shared))
    if shared is not None:
        shared.hidden.clear()  # the verification was their only reader
    lend = compare is not None and shared is not None and shared.serves(compare.dtype, compare.device)
    if shared is not None and not lend:
        shared.release()  # no later step borrows it: the export does not hold it beside the 4-bit model
    with stage("export"):
        result = export(source, chosen, checkpoint, overwrite=overwrite, device=analyze_config.device,
                        compute_dtype=export_dtype(analyze_config),
                        max_memory=parse_size(analyze_config.max_memory) if analyze_config.max_memory else None,
                        reuse=shared.export_reuse() if lend else None)
    print(export_summary(checkpoint, chosen, result))
    reports = {}
    if compare is not None:
        from quantplan.reports.run import compare_and_report

        if analyze_config.max_memory:  # the scoreboard streams too, under the same cap
            compare = replace(compare, max_memory=analyze_config.max_memory)
        with stage("compare + report"):
            reports = compare_and_report(source, table, [chosen], out_dir, pareto=out_dir / "pareto.csv",
                                         options=compare, model16=shared.get() if lend else None,
                                         packed=shared.packed if lend else None,
                                         checkpoint=checkpoint if analyze_config.max_memory else None)
    return {**reports, "out": out_dir, "table": out_dir / TABLE_FILE, "plan": out_dir / "plan.json",
            "pareto": out_dir / "pareto.csv", "checkpoint": checkpoint, "export": result, "plan_obj": chosen}


def verified_batches(end_to_end: EndToEnd, config: AnalyzeConfig) -> int | None:
    """How many calibration batches the verification and refinement read (None: all; 0 when neither runs), and as
    many after them where a refinement may run (its held-back choice reads those: :meth:`EndToEnd.heldback_reference`):
    the batches whose 16-bit last hidden states the analysis keeps for them (:class:`~analysis.kept_hidden.KeptHidden`)."""
    if not end_to_end.active:
        return 0
    count = end_to_end.batches(config)
    return count if count is None or not end_to_end.may_refine else 2 * count


def check_budget_fits(source: ModelSource, budget, config: AnalyzeConfig, plan_config: PlanConfig | None = None) -> None:
    """Refuse a budget below the all-4-bit size, known from the config and shapes before any weight is read
    (with ``--kv-context``, the device budget less the KV cache and activations)."""
    from quantplan.analysis.estimate import estimate_sizes

    four_bit = sorted((f for f in config.format_values() if f.bits == 4), key=lambda f: f.blocksize != 64)
    if not four_bit:
        return
    sizes = estimate_sizes(source.path, four_bit[0])
    capacity = parse_budget(budget).resolve(sizes.bytes_all_4bit, sizes.bytes_16bit)
    label = f"budget {budget}"
    if plan_config is not None and plan_config.kv_context is not None:
        from transformers import AutoConfig

        from quantplan.analysis.attention import attention_config
        from quantplan.planner.kv_cache import device_budget

        split = device_budget(attention_config(AutoConfig.from_pretrained(source.path)), budget,
                              plan_config.kv_context, plan_config.kv_batch)
        capacity, label = split.weights_bytes, f"{budget} less the KV cache and activations"
    if capacity < sizes.bytes_all_4bit * 0.999:  # the estimate leaves out a few bytes of JSON metadata
        raise BudgetError(
            f"{label} = {format_bytes(capacity)} is below this model's all-4-bit size of about "
            f"{format_bytes(sizes.bytes_all_4bit)} (every quantizable Linear in {four_bit[0].name}, lm_head 16-bit): "
            f"raise the budget to at least that (16-bit is {format_bytes(sizes.bytes_16bit)})")


def analyze_model(source: ModelSource, out_dir: str | Path, config: AnalyzeConfig, *,
                  reuse: bool = False, shared: SharedModel | None = None) -> SensitivityTable:
    """Measure a model (or reuse the matching table already in ``out_dir``); ``max_memory="auto"`` streams it
    when the estimated in-memory peak exceeds the available memory (:mod:`quantplan.dry_run`). ``shared``: the
    run's 16-bit model, borrowed instead of loaded (and kept for the steps after)."""
    bind_local_gpu(config.device)  # before --max-memory auto reads a GPU's free memory
    config = choose_max_memory(source, config)
    config.check_equalize()  # an explicit --equalize that streaming cannot honour, refused before any work
    formats = config.format_values()
    calibration = calibration_of(source, config)
    out_dir = Path(out_dir)
    fisher = config.fisher
    windows = backward_share(calibration, config.batch_size, config.fisher_samples).windows if fisher else None
    if reuse and (table := _matching_table(out_dir, source, calibration, formats, windows, config.context,
                                           config.equalizes)):
        if shared is not None:
            shared.equalization = equalization_of(table.meta)  # the verification's model is scaled as measured
        return table
    if config.max_memory:
        if replace(config, max_memory=None).equalizes:  # what the same run in memory would do
            print("quantplan: --max-memory: the channel equalization of an in-memory run is not streamed yet, so this "
                  "run measures and plans the source weights as they are")
        table = _analyze_streaming(source, calibration, formats, out_dir, config)
    else:
        init_from_environment(config.device)  # torchrun / accelerate launch: share the batches
        packed = None
        hidden = None
        if shared is not None and shared.serves(config.dtype, config.device):
            model, packed, hidden = shared.get(), shared.packed, shared.hidden
        else:
            with stage("load model"):
                model = load_model(source, dtype=dtype_from_name(config.dtype), device=config.device)
        table = analyze(model, calibration, formats, model_id=source.model_id, model_fingerprint=source.fingerprint,
                        batch_size=config.batch_size, out_dir=out_dir, resume=config.resume,
                        progress=config.progress, fisher=fisher, context=config.context, packed=packed,
                        hidden=hidden, equalize=config.equalizes, fisher_samples=config.fisher_samples)
        if shared is not None:
            shared.equalization = equalization_of(table.meta)  # applied in place already; again on a reload
        del model
        gc.collect()
    print(summarize(table))
    return table


def _matching_table(out_dir: Path, source, calibration, formats, backward_windows: int | None, context: bool,
                    equalize: bool):
    """The table saved in ``out_dir`` if it was made for this model, calibration and formats (and, where
    ``backward_windows`` is given, Fisher scores backpropagating that many windows); else None."""
    if not ((out_dir / TABLE_FILE).is_file() and (out_dir / META_FILE).is_file()):
        return None
    table = SensitivityTable.load(out_dir)
    try:
        table.check_matches(source.fingerprint, calibration.fingerprint, [f.name for f in formats])
        if backward_windows is not None and not table.meta.get("fisher"):
            raise TableMismatch("the saved table has no Fisher scores")
        saved_windows = table.meta.get("fisher_samples", table.meta["calibration"].get("samples"))
        if backward_windows is not None and saved_windows != backward_windows:
            raise TableMismatch(f"the saved table's Fisher scores backpropagated {saved_windows} calibration windows "
                                f"and this run asks for {backward_windows}: pass --fisher-samples {saved_windows} to "
                                "reuse it")
        if context and not table.meta.get("context"):
            raise TableMismatch("the saved table has no quantized-context scores")
        if equalize != (table.meta.get("equalization") is not None):
            raise TableMismatch("the saved table was measured without channel scales and this run equalizes"
                                if equalize else "the saved table was measured on channel-scaled weights and this run "
                                "keeps the source weights (--no-equalize, --formats or --max-memory)")
    except TableMismatch as err:
        print(f"quantplan: not reusing {out_dir / TABLE_FILE}: {err}")
        return None
    print(f"quantplan: reusing the matching sensitivity table in {out_dir}")
    return table


def _analyze_streaming(source, calibration, formats, out_dir, config: AnalyzeConfig) -> SensitivityTable:
    from quantplan.analysis.streaming import analyze_streaming

    return analyze_streaming(source.path, calibration, formats, max_memory=config.max_memory,
                             dtype=dtype_from_name(config.dtype), model_id=source.model_id,
                             model_fingerprint=source.fingerprint, batch_size=config.batch_size, out_dir=out_dir,
                             resume=config.resume, progress=config.progress, fisher=config.fisher,
                             device=config.device, context=config.context, fisher_samples=config.fisher_samples)


def plan_and_save(table: SensitivityTable, budget, out_dir: str | Path, config: PlanConfig | None = None,
                  make_plan=None) -> Plan:
    """Plan under ``budget`` (``make_plan()`` instead of ``config.plan`` when given: the end-to-end steps),
    write plan.json and pareto.csv, print a summary."""
    out_dir = Path(out_dir)
    config = config or PlanConfig()
    chosen = make_plan() if make_plan else config.plan(table, budget)
    record = chosen.checks.verification
    planned_with = replace(config, tiers=tuple(chosen.used_formats)) if record and record.sibling_shipped else config
    chosen = replace(chosen, compat=loader_compat(table, chosen, planned_with))
    chosen.save(out_dir / "plan.json")
    with stage("pareto curve"):
        pareto_curve(table, config=config).to_csv(out_dir / "pareto.csv", index=False)
    print(plan_summary(chosen))
    print(kept_summary(chosen))
    print(vllm_sentence(chosen).replace("`", ""))
    return chosen


def plan_summary(p: Plan) -> str:
    """A few lines describing a plan (with the device budget's weights + KV cache + activations when planned so)."""
    pr = p.predicted
    return device_line(p) + (f"plan: budget {p.budget.spec} = {format_bytes(p.budget.bytes)}; predicted "
            f"{format_bytes(pr.bytes)} ({pr.over_all_4bit:+.1%} over all-4-bit {format_bytes(pr.bytes_all_4bit)}, "
            f"16-bit {format_bytes(pr.bytes_16bit)}); {len(p.kept)} modules kept 16-bit; predicted error "
            f"{pr.error:.4g} vs all-4-bit {pr.error_all_4bit:.4g}")


def export_summary(checkpoint: Path, chosen: Plan, result) -> str:
    """One line on the written checkpoint: measured vs predicted footprint, module counts."""
    predicted = chosen.predicted.footprint_bytes
    return (f"quantplan: wrote {checkpoint} — get_memory_footprint() {format_bytes(result.footprint_bytes)} "
            f"(predicted {format_bytes(predicted)}, {result.footprint_bytes / predicted - 1:+.2%}); "
            f"checkpoint tensors {format_bytes(result.checkpoint_bytes)}; "
            f"{result.kept} modules 16-bit, {result.quantized} 4-bit")
