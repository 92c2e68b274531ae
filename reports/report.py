"""write_report(): ``report.md`` and a self-contained ``report.html`` from a table, plans and a comparison.

Both are rendered from one list of blocks (headings, paragraphs, tables, figures), so they
always say the same thing. The HTML embeds its plots as base64 PNG data URIs and needs
nothing else (no scripts, no network); the Markdown references the PNG files written beside
it (SVG copies are written too).
"""

from __future__ import annotations

import base64
import html
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from quantplan.analysis.spikes import SPIKE_Z
from quantplan.analysis.table import SensitivityTable
from quantplan.common.files import atomic_write_text
from quantplan.common.sizes import format_bytes
from quantplan.planner.compat import (
    cost_note,
    cost_rows,
    format_rows,
    name_rows,
    skip_list_sentence,
    vllm_sentence,
)
from quantplan.planner.kv_cache import device_line
from quantplan.planner.plan_types import Plan
from quantplan.planner.reasons import ReasonKind

from . import plots
from .compare import QUICK_SKIPS, ReportDepth
from .result import Comparison
from .scoreboard import DISPLAY_NUMERIC, display_frame, footnotes
from .tables import html_table, markdown_table

FIGURES = ("layer_errors", "weight_heatmap", "input_outliers", "pareto")


def write_report(out_dir: str | Path, table: SensitivityTable, plans: list[Plan], comparison: Comparison,
                 pareto: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the plots (PNG + SVG) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pareto is None:
        pareto = _pareto_for(table, plans)
    figures = {
        "layer_errors": plots.plot_layer_errors(table),
        "weight_heatmap": plots.plot_weight_heatmap(table),
        "input_outliers": plots.plot_input_outliers(table),
        "pareto": plots.plot_pareto(pareto, comparison.scoreboard, plans),
    }
    saved = {name: plots.save_figure(fig, out_dir, name) for name, fig in figures.items()}
    blocks = report_blocks(table, plans, comparison)
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, {n: p["png"] for n, p in saved.items()}))
    return {"md": out_dir / "report.md", "html": out_dir / "report.html",
            **{f"{n}.{k}": v for n, p in saved.items() for k, v in p.items()}}


def report_blocks(table: SensitivityTable, plans: list[Plan], comparison: Comparison) -> list[tuple]:
    """The report's content as (kind, ...) blocks: h1/h2/p/list/table/notes/figure/code."""
    meta, board = comparison.meta, comparison.scoreboard
    calib, held = table.meta.get("calibration", {}), meta.get("heldout", {})
    blocks = [("h1", f"quantplan report: {table.meta.get('model_id', '')}"),
              ("list", [f"Model: `{table.meta.get('model_id', '')}` ({table.meta.get('model_class', '')}, "
                        f"{table.meta.get('dtype', '')}; fingerprint `{table.meta.get('model_fingerprint', '')}`)",
                        f"Calibration data (the probe): {_data(calib)}",
                        f"Held-out data (the scoreboard, disjoint from calibration): {_data(held)}",
                        *[_budget_line(p) for p in plans],
                        f"Created {datetime.now(UTC).isoformat(timespec='seconds')}; versions: "
                        + ", ".join(f"{k} {v}" for k, v in table.meta.get("versions", {}).items())])]
    if str(table.meta.get("model_fingerprint", "")).startswith("gguf:"):
        blocks.append(("p", "Note: this offline default model was de-quantized from a Q4_1 GGUF file, so its "
                            "'16-bit' reference is itself already coarse; the numbers measure distance from it."))
    blocks += [("h2", "Scoreboard"),
               ("p", "Fidelity to the 16-bit model on held-out text, in the style of llama.cpp's "
                     "`llama-perplexity` (value ± standard error over tokens). KLD in nats; Size is the predicted "
                     "checkpoint size of the weights; Footprint is `get_memory_footprint()` (measured for "
                     "bitsandbytes loads, predicted for simulated rows). *bitsandbytes* rows were loaded through "
                     "`BitsAndBytesConfig` (under --max-memory, the exported checkpoint's row runs its own tensors "
                     "block by block, its 4-bit Linears bitsandbytes' `Linear4bit`); *simulated* rows replace the weights of the 16-bit model by bitsandbytes' "
                     "own quantize/de-quantize round trip (what its CPU kernels compute). *Simulated KLD* is that "
                     "simulation's mean KLD, also for all-4-bit and the plans, so that the verdicts below compare "
                     "plans and heuristics like for like. Heuristic baselines spend the same bytes as their "
                     "dynamic plan (greedy fill, never more). Full numbers: `scoreboard.csv`."),
               *([("p", f"Quick report: {QUICK_SKIPS['seeds']}; the predicted-vs-measured checks"
                        + (" and the generations" if meta.get("skipped") else f", the generations, all-INT8 "
                           f"({QUICK_SKIPS['int8']}), and the real bitsandbytes load of all-4-bit (the simulation check)")
                        + " are left out (`--report full` measures them).")]
                 if meta.get("report") == ReportDepth.QUICK.value else []),
               *([("p", "Channel scales: the checkpoint holds equalized weights (power-of-two scales between each "
                        "norm and its Linears, and between up_proj and down_proj, that leave the 16-bit outputs "
                        "unchanged and lower the 4-bit error). Every row runs on those weights, the heuristics "
                        "included, but the all-4-bit row of the source weights: plain bitsandbytes without quantplan, "
                        "the row recovery is counted from.")] if meta.get("equalized") else []),
               *([("p", f"Measured block by block under --max-memory {meta.get('max_memory')}: "
                        + "; ".join([*([meta["measured"]["exported"]] if meta.get("measured") else []),
                                     *meta["skipped"].values()]) + ".")] if meta.get("skipped") else []),
               ("table", display_frame(board), DISPLAY_NUMERIC),
               ("notes", footnotes(board)),
               ("list", comparison.verdicts or ["No heuristic baselines were measured."])]
    check = meta.get("simulation_check", {})
    if "bitsandbytes_mean_kld" in check:
        blocks.append(("p", f"Simulation check: {check['variant']} measured through a real bitsandbytes load has "
                            f"mean KLD {check['bitsandbytes_mean_kld']:.6f}; simulated in the 16-bit model (how the "
                            f"heuristic rows are measured) {check['simulated_mean_kld']:.6f}."))
    blocks += _agreement_blocks(comparison)
    blocks += [("h2", "Generations")]
    if meta.get("skipped", {}).get("generations"):
        blocks.append(("p", f"Not measured: {meta['skipped']['generations']}."))
    elif meta.get("report") == ReportDepth.QUICK.value:
        blocks.append(("p", f"Not measured: {QUICK_SKIPS['generations']}."))
    else:
        blocks += [("p", "Greedy continuations of fixed prompts, one column per variant."),
                   ("table", comparison.generations_frame(), ())]
    blocks += _plot_blocks(table)
    for p in plans:
        blocks += _plan_blocks(p)
    return blocks


def _agreement_blocks(comparison: Comparison) -> list[tuple]:
    stats = comparison.meta.get("agreement", {})
    frame = comparison.agreement.copy()
    if frame.empty:
        why = f": {stats['skipped']}" if stats.get("skipped") else ""
        return [("h2", "Predicted vs measured"), ("p", f"Not measured{why}.")]
    frame["predicted"] = frame["predicted"].map(lambda v: f"{v:.4g}")
    frame["measured_kld"] = frame["measured_kld"].map(lambda v: f"{v:.4g}")
    return [("h2", "Predicted vs measured"),
            ("p", f"The {stats.get('modules')} modules below (the top by the planner's `{stats.get('objective')}` "
                  f"score, plus a random sample of the other {stats.get('candidates', 0) - (frame['selected'] == 'top').sum()}) "
                  f"were each quantized alone and the model's mean KLD from 16-bit measured on "
                  f"{stats.get('tokens')} held-out tokens. Spearman rank correlation between predicted score and "
                  f"measured KLD: ρ = {stats.get('spearman', float('nan')):.3f} (p = {stats.get('p_value', float('nan')):.3g})."),
            ("p", f"Verdict: {stats.get('verdict', '')}."),
            ("table", frame, ("predicted", "predicted_rank", "measured_kld"))]


def _plot_blocks(table: SensitivityTable) -> list[tuple]:
    spikes = plots.spike_table(table)
    spikes["output_rel_error"] = spikes["output_rel_error"].map(lambda v: f"{v:.4g}")
    spikes["z"] = spikes["z"].map(lambda v: f"{v:.1f}")
    rule = (f"Spike rule: within each (group, module type), the robust z-score of log output error along the "
            f"layer axis, (v − median) / (1.4826 · MAD); a module with z > {SPIKE_Z} is a spike "
            f"(Iglewicz and Hoaglin's cut-off).")
    return [("h2", "Where the error is"),
            ("figure", "layer_errors", "Output error per layer, one line per module type; spikes ringed in red"),
            ("p", rule),
            ("table", spikes, ("layer", "output_rel_error", "z")) if len(spikes) else ("p", "No module spikes."),
            ("figure", "weight_heatmap", "Relative weight error, module type by layer"),
            ("figure", "input_outliers", "Input activation outliers per layer"),
            ("h2", "Pareto curve"),
            ("p", "Predicted summed error of the exact plan at each budget from all-4-bit to 16-bit (left axis), "
                  "and the measured mean KLD of every compared variant at its bytes (right axis)."),
            ("figure", "pareto", "Bytes vs predicted error with measured KLD points")]


def _plan_blocks(p: Plan) -> list[tuple]:
    kept = pd.DataFrame({"module": p.kept, "reason": [p.reasons[n].text for n in p.kept]})
    return [("h2", f"Plan {p.budget.spec}: {len(p.kept)} modules kept 16-bit"),
            ("p", _budget_line(p)),
            ("table", kept, ()),
            *_compat_blocks(p),
            ("p", "To quantize the model this way yourself:"),
            ("code", p.bnb_config_code())]


def _compat_blocks(p: Plan) -> list[tuple]:
    """Loader compatibility: vLLM-safe, --vllm-safe's cost at equal bytes, skip list names, skip-list-only mode
    at equal bytes and per-module formats (menu plans)."""
    blocks = [("p", "**Loader compatibility.** " + vllm_sentence(p))]
    if costs := cost_rows(p):
        blocks += [("p", "`--vllm-safe` at the same weight budget (predicted from the table, no extra model run)."
                         + cost_note(p)),
                   ("table", pd.DataFrame(costs), ("predicted bytes", "predicted error", "modules kept 16-bit"))]
    if names := name_rows(p):
        blocks += [("p", "The skip list in transformers 5's live module names (`config.json`) and in the "
                         "checkpoint's tensor names (what vLLM reads):"), ("table", pd.DataFrame(names), ())]
    if skip_only := skip_list_sentence(p):
        blocks.append(("p", skip_only))
    if formats := format_rows(p):
        blocks += [("p", "Per-module 4-bit formats (the plan mixes them):"), ("table", pd.DataFrame(formats), ())]
    return blocks


def _budget_line(p: Plan) -> str:
    pr = p.predicted
    return device_line(p).replace("\n", "; ") + (f"Budget {p.budget.spec} = {format_bytes(p.budget.bytes)}: plan predicted {format_bytes(pr.bytes)} "
            f"({pr.over_all_4bit:+.1%} over all-4-bit {format_bytes(pr.bytes_all_4bit)}; 16-bit "
            f"{format_bytes(pr.bytes_16bit)}), {len(p.kept)} modules kept 16-bit, objective `{p.objective}`, "
            f"format {p.quant.get('name', p.tiers[0] if p.tiers else '')}")


def _data(meta: dict) -> str:
    if not meta:
        return "unknown"
    return (f"`{meta.get('source')}`, {meta.get('samples')} windows x {meta.get('seq_len')} tokens = "
            f"{meta.get('tokens')} tokens (seed {meta.get('seed')}, fingerprint `{meta.get('fingerprint')}`)")


def to_markdown(blocks: list[tuple]) -> str:
    """Render blocks as GitHub Markdown (figures reference ``<name>.png`` beside the file)."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(("#" if kind == "h1" else "##") + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            out.append(markdown_table(args[0], align={c: "right" for c in args[1]}))
        elif kind == "notes" and args[0]:
            out.append("\n".join(f"{mark} {text}  " for mark, text in args[0]))
        elif kind == "figure":
            out.append(f"![{args[1]}]({args[0]}.png)\n\n*{args[1]}* ([SVG]({args[0]}.svg))")
        elif kind == "code":
            out.append(f"```python\n{args[0].rstrip()}\n```")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], pngs: dict[str, Path]) -> str:
    """Render blocks as one self-contained HTML page (plots inlined as base64 PNG)."""
    body = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(args[0])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            body.append(f'<div class="scroll">{html_table(args[0], numeric=tuple(args[1]))}</div>')
        elif kind == "notes" and args[0]:
            body.append('<p class="notes">' + "<br>".join(f"{mark} {_inline(t)}" for mark, t in args[0]) + "</p>")
        elif kind == "figure":
            data = base64.b64encode(Path(pngs[args[0]]).read_bytes()).decode()
            body.append(f'<figure id="fig-{args[0]}"><img alt="{html.escape(args[1])}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(args[1])}</figcaption></figure>')
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(args[0])}</code></pre>")
    title = html.escape(next((a[0] for k, *a in blocks if k == "h1"), "quantplan report"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> and *emphasis* outside them into <em> (the Markdown
    inlines the blocks use)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else _EMPHASIS.sub(r"<em>\1</em>", p) for i, p in enumerate(parts))


_EMPHASIS = re.compile(r"(?<![\w*])\*(?![\s*])([^*]+?)(?<!\s)\*(?![\w*])")


def _pareto_for(table: SensitivityTable, plans: list[Plan]) -> pd.DataFrame:
    from quantplan.planner.config import PlanConfig
    from quantplan.planner.pareto import pareto_curve

    first = plans[0]
    priors = tuple(n for n, r in first.reasons.items() if r.kind is ReasonKind.PRIOR)  # kept by rule: fixed 16-bit
    config = PlanConfig(objective=first.objective, tiers=tuple(first.tiers), vllm_safe=first.vllm_safe,
                        keep=priors, priors="none")
    return pareto_curve(table, config=config)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.num .se{display:block;font-size:.85em;color:#666}.notes{font-size:.85em;color:#444}
.scroll{overflow-x:auto}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}code{background:#f5f5f5;padding:0 .2em}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.85em}
"""
