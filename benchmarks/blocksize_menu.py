"""Blocksize menu on SmolLM2-135M: 16-bit keeps at blocksize 64 vs a per-module NF4 blocksize menu (64 / 32).

One analysis (Fisher, ``--formats nf4,nf4-bs32``) gives both plans from the same statistics; a
second, timed, one-format analysis gives the menu's analysis cost. For each budget (+10 %, +33 %
over all-NF4 at blocksize 64) the rows are

- ``skip-list only (nf4)``: today's plan, blocksize 64 + 16-bit keeps (``--tiers nf4``);
- ``menu (nf4 + nf4-bs32)``: the exact knapsack over {nf4, nf4-bs32, 16-bit} per module;
- ``bs32 everywhere + keeps``: ``--tiers nf4-bs32`` at the same bytes as the skip-list plan;
- ``shipped by quantplan run``: the menu plan after the verification on the calibration batches, which
  measures it beside its single-format siblings at the same bytes and ships the lowest calibration KL
  (``--no-verify`` skips this row);
- with ``--refine N``: ``quantplan run --refine N``, the refinement over the menu then the same verification;

each simulated with bitsandbytes' round trip in its planned format per module, measured as the
mean next-token KL divergence vs 16-bit on the shipped held-out text (disjoint from calibration);
recovery = share of the all-NF4 (blocksize 64) KL closed. The menu and bs32 rows also give their KLD
minus the skip-list plan's on the same tokens, with a standard error over the held-out windows
(paired: what separates the rows from noise), and every plan row its predicted error from the table.

    python benchmarks/blocksize_menu.py [--model FOLDER] [--samples 32] [--seq-len 256] [--heldout 16] [--no-cost]
                                        [--dtype bf16|fp16|fp32]

``--dtype fp32`` runs the model (analysis, reference and every variant) in float32: on a CPU without
native bf16 matrix kernels (AVX2 only) bf16 matmuls fall back to a reference GEMM 10-20x slower, and
the comparison of plans only needs all rows in one dtype.

Writes benchmarks/results/blocksize_menu.json (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

from plan_quality import _machine, _timed, add_analysis_arguments, reused_table  # noqa: E402

from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from quantplan.analysis.equalize import apply_equalization, equalization_of  # noqa: E402
from quantplan.analysis.formats import NF4_BS32  # noqa: E402
from quantplan.analysis.models import DTYPES  # noqa: E402
from quantplan.analysis.reference import KLReference  # noqa: E402
from quantplan.analysis.simulate import QuantCache  # noqa: E402
from quantplan.endtoend import EndToEnd  # noqa: E402
from quantplan.planner import plan  # noqa: E402
from quantplan.planner.baselines import all_4bit, plan_keep_set  # noqa: E402
from quantplan.planner.config import PlanConfig  # noqa: E402
from quantplan.reports.fidelity import heldout_reference, measure_variants  # noqa: E402

BUDGETS = ("+10%", "+33%")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the offline SmolLM2)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--no-cost", action="store_true", help="skip the timed one-format analysis")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the row of what quantplan run ships (the verification on the calibration batches)")
    parser.add_argument("--refine", type=int, default=0, help="also a row for `quantplan run --refine N` (N rounds)")
    parser.add_argument("--end-to-end-batches", type=int, default=None,
                        help="calibration batches the verification and --refine use (quantplan run's option; default all)")
    parser.add_argument("--table", help="folder to reuse the menu table from (analyzed and saved there if missing; "
                                        "with --no-cost the run then times nothing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype the model runs in")
    add_analysis_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blocksize_menu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    source = resolve_source(args.model)
    model, tokenizer = load_model(source, dtype=DTYPES[args.dtype]), load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    common = {"progress": False, "fisher": True, "model_fingerprint": source.fingerprint,
              "fisher_samples": args.fisher_samples}
    costs = {}
    heldout = load_calibration(tokenizer, "heldout", args.heldout, args.seq_len)
    reference = heldout_reference(model, heldout.input_ids)  # the same logits after the scales (bit-identical)
    source_nf4 = float(measure_variants(reference, QuantCache(model, NF4), {"v": all_4bit_names(model)})["v"].kld.mean())
    print(f"all-NF4 of the source weights: KLD {source_nf4:.4f}", flush=True)
    if args.table and (Path(args.table) / "sensitivity.json").is_file():
        table = reused_table(args.table, calibration, fisher_samples=args.fisher_samples)
        apply_equalization(model, equalization_of(table.meta))  # the weights the table measured
    else:
        table, cost = _timed(lambda: analyze(model, calibration, [NF4, NF4_BS32], out_dir=args.table,
                                             equalize=args.equalize, **common))
        costs["nf4,nf4-bs32"] = cost
        print(f"menu analysis: CPU {cost['cpu_s']:.1f} s, wall {cost['wall_s']:.1f} s", flush=True)

    cache = QuantCache(model, NF4)

    def kld(keep) -> np.ndarray:
        """Per-token KLD of the keep set on the held-out windows (window-major order)."""
        variant = {n: keep.formats.get(n) for n in keep.quantized}
        return measure_variants(reference, cache, {"v": variant})["v"].kld

    windows = int(heldout.input_ids.shape[0])
    base = all_4bit(table, "nf4")
    all_nf4 = float(kld(base).mean())
    rows = [_row("–", "all-NF4, blocksize 64", base, all_nf4, all_nf4, base.bytes, {})]
    bs32 = all_4bit(table, "nf4-bs32")
    rows.append(_row("–", "all-NF4, blocksize 32", bs32, float(kld(bs32).mean()), all_nf4, base.bytes, {}))
    print(_line(rows[-1]), flush=True)
    verified = {}
    for budget in BUDGETS:
        skip_only = plan(table, budget, tiers=["nf4"])
        variants = {"skip-list only (nf4)": skip_only,
                    "menu (nf4 + nf4-bs32)": plan(table, budget),
                    "bs32 everywhere + keeps (same bytes)": plan(table, skip_only.budget.bytes, tiers=["nf4-bs32"])}
        checks = {"reference": KLReference(model, calibration, 4, args.end_to_end_batches),
                  "cache": QuantCache(model, NF4), "progress": False, "heldback": _heldback(model, calibration, args)}
        for rounds in ([0] if args.verify else []) + ([args.refine] if args.refine else []):
            shipped, record = _end_to_end(rounds, table, budget, model, calibration, checks)
            verified[budget if not rounds else f"{budget} --refine {rounds}"] = record
            command = "`quantplan run`" if not rounds else f"`quantplan run --refine {rounds}`"
            variants[f"shipped by {command} (verification chose: {record['chosen']})"] = shipped
        skip_kld = None
        for label, p in variants.items():
            keep = plan_keep_set(table, p)
            counts = {t: sum(1 for c in p.choices.values() if c == t) for t in p.used_formats}
            per_token = kld(keep)
            row = _row(budget, label, keep, float(per_token.mean()), all_nf4, base.bytes, counts)
            row["predicted_error"] = p.predicted.error
            if skip_kld is None:
                skip_kld = per_token
            else:
                row["vs_skip_list"], row["vs_skip_list_se"] = _paired(per_token - skip_kld, windows)
            rows.append(row)
            print(_line(rows[-1]) + f" (vs source all-NF4 {1 - row['kld'] / source_nf4:.1%})", flush=True)
    for row in rows:  # what a user gets without quantplan: plain NF4 of the source weights
        row["recovery_vs_source_nf4"] = 1 - row["kld"] / source_nf4
    if not args.no_cost and costs:  # after the rows: the held-out numbers come first on a slow machine
        costs["nf4"] = _timed(lambda: analyze(model, calibration, [NF4], **common))[1]
        print("analysis CPU s: " + ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in costs.items()), flush=True)
    summary = {"model": source.model_id, "dtype": args.dtype, "calibration_tokens": calibration.tokens,
               "fisher_samples": table.meta.get("fisher_samples", table.meta["calibration"]["samples"]),
               "heldout_tokens": heldout.tokens, "all_nf4_kld": all_nf4, "source_all_nf4_kld": source_nf4,
               "equalization": bool(equalization_of(table.meta)), "analysis": costs, "rows": rows, "verification": verified,
               "machine": _machine()}
    if "nf4" in costs and "nf4,nf4-bs32" in costs:
        summary["menu_analysis_cost_over_one_format"] = costs["nf4,nf4-bs32"]["cpu_s"] / costs["nf4"]["cpu_s"] - 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(markdown(summary))


def all_4bit_names(model) -> list[str]:
    """Every plain Linear but the output head: all-NF4 of the weights as they are."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]


def _heldback(model, calibration, args):
    """The calibration batches after the end-to-end ones, which choose between a refined and the first plan as in
    ``quantplan run`` (None with all batches end to end, or none left after them: the refined plan then ships)."""
    batches = args.end_to_end_batches
    if batches is None or calibration.num_batches(4) <= batches:
        return None
    return KLReference(model, calibration, 4, batches, first_batch=batches)


def _end_to_end(rounds, table, budget, model, calibration, checks):
    """The plan ``quantplan run`` ships at ``budget`` (``rounds`` of refinement first, as ``--refine``), and what
    its verification measured."""
    shipped, cost = _timed(lambda: EndToEnd(refine=rounds).run_checks(table, budget, PlanConfig(), model, calibration,
                                                                      **checks))
    record = shipped.checks.verification
    return shipped, {"calibration_kld": record.calibration_kld, "chosen": record.chosen, "tokens": record.tokens,
                     **cost}


def _row(budget, label, keep, value, all_nf4, bytes_all_nf4, formats) -> dict:
    return {"budget": budget, "variant": label, "kept": len(keep.kept), "formats": formats, "kld": value,
            "recovery": (all_nf4 - value) / all_nf4, "bytes": int(keep.bytes),
            "over_all_nf4": keep.bytes / bytes_all_nf4 - 1}


def _paired(diff: np.ndarray, windows: int) -> tuple[float, float]:
    """Mean of a per-token KLD difference and its standard error over the held-out windows (tokens within
    a window are correlated, windows roughly independent)."""
    means = np.array([part.mean() for part in np.array_split(diff, windows)])
    return float(diff.mean()), float(means.std(ddof=1) / np.sqrt(windows)) if windows > 1 else float("nan")


def _line(row) -> str:
    paired = f" vs skip-list {row['vs_skip_list']:+.4f} ± {row['vs_skip_list_se']:.4f}" if "vs_skip_list" in row else ""
    return (f"{row['budget']:>5} {row['variant']:<38} kept {row['kept']:>3} {row['over_all_nf4']:+.1%} "
            f"KLD {row['kld']:.4f} recovery {row['recovery']:.0%}{paired}")


def markdown(summary: dict) -> str:
    """The results as a Markdown table."""
    lines = [f"all-NF4 (blocksize 64) KLD {summary['all_nf4_kld']:.4f} (of the source weights: "
             f"{summary['source_all_nf4_kld']:.4f}; channel scales: {summary['equalization']})", "",
             "| budget | variant | 16-bit | in nf4-bs32 | bytes over all-NF4 | KLD | recovery | recovery vs source "
             "all-NF4 | KLD − skip-list (± SE) | predicted error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        paired = f"{r['vs_skip_list']:+.4f} ± {r['vs_skip_list_se']:.4f}" if "vs_skip_list" in r else "–"
        predicted = f"{r['predicted_error']:.4g}" if "predicted_error" in r else "–"
        lines.append(f"| {r['budget']} | {r['variant']} | {r['kept']} | {r['formats'].get('nf4-bs32', '–')} | "
                     f"{r['over_all_nf4']:+.1%} | {r['kld']:.4f} | {r['recovery']:.0%} | "
                     f"{r['recovery_vs_source_nf4']:.1%} | {paired} | {predicted} |")
    if "menu_analysis_cost_over_one_format" in summary:
        lines.append(f"\nanalysis CPU time, menu over one format: {summary['menu_analysis_cost_over_one_format']:+.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
