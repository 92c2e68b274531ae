"""Plan quality on SmolLM2-135M: how much of the all-NF4 KL gap each way of choosing 16-bit modules closes.

For each budget (+10 %, +33 % over all-NF4) and each way of scoring modules, the chosen modules
stay 16-bit and every other Linear is NF4 (simulated: bitsandbytes' round-tripped weights, which
is what Linear4bit computes on CPU). Mean next-token KL divergence vs the 16-bit model is
measured on held-out text disjoint from the calibration text; recovery = share of the all-NF4
KL closed. Rows:

- the planner's objectives (exact knapsack on the table's scores): output, weight, combined,
  fisher (16-bit context), restore (quantized context, ``--context``);
- ``refined``: ``--refine 4`` rounds of measured KL gradients (opt-in, its own cost);
- ``shipped``: what ``quantplan run`` writes by default (objective auto + the verification);
- heuristics at the same bytes: first+last layers, weight error, random (3 seeds);
- with ``--single-module``: the issue's N-forward scores, each module's exact calibration KL
  effect (restore it alone into all-NF4 / quantize it alone), on ``--single-windows`` windows.

Cost: analysis time / one plain forward over the same calibration tokens, CPU time of the
process (robust to other jobs on a shared machine), for each analysis mode.

    python benchmarks/plan_quality.py [--model FOLDER] [--samples 32] [--seq-len 256] [--heldout 16] [--single-module]

Writes benchmarks/results/plan_quality.json (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")

from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from quantplan.analysis.calibration import CalibrationSet  # noqa: E402
from quantplan.analysis.reference import KLReference, calibration_kld  # noqa: E402
from quantplan.analysis.simulate import QuantCache  # noqa: E402
from quantplan.analysis.table import SensitivityTable  # noqa: E402
from quantplan.planner import plan  # noqa: E402
from quantplan.planner.baselines import baseline_keep_sets  # noqa: E402
from quantplan.planner.refine import refine  # noqa: E402
from quantplan.planner.verify import verify  # noqa: E402
from quantplan.reports.fidelity import heldout_reference, measure_variants  # noqa: E402

OBJECTIVES = ("output", "weight", "combined", "fisher", "restore")
BUDGETS = ("+10%", "+33%")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--refine", type=int, default=4, help="rounds of the refined row (0: skip)")
    parser.add_argument("--single-module", action="store_true", help="also the N-forward single-module scores")
    parser.add_argument("--single-windows", type=int, default=4, help="calibration windows for --single-module")
    parser.add_argument("--no-cost", action="store_true",
                        help="analyze once (Fisher + context) without timing the three analysis modes")
    parser.add_argument("--cost-only", action="store_true", help="only time the analysis modes against a forward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    parser.add_argument("--table", help="folder to reuse the Fisher+context table from (analyzed and saved there "
                                        "if missing)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_quality.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    source = resolve_source(args.model)
    model, tokenizer = load_model(source), load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    forward = _forward_cost(model, calibration)
    cost, tables = {}, {}
    modes = {"output": {}, "fisher": {"fisher": True}, "fisher+context": {"fisher": True, "context": True}}
    for mode, flags in modes.items():
        if args.no_cost and mode != "fisher+context":
            continue
        if args.table and mode == "fisher+context" and (Path(args.table) / "sensitivity.json").is_file():
            tables[mode] = reused_table(args.table, calibration)
            continue
        if args.table and mode == "fisher+context":
            flags = {**flags, "out_dir": args.table}
        tables[mode], cost[mode] = _timed(lambda f=flags: analyze(model, calibration, [NF4], progress=False,
                                                                  model_fingerprint=source.fingerprint, **f))
        print(f"analysis {mode}: {cost[mode]['cpu_s']:.1f} s CPU = {cost[mode]['cpu_s'] / forward['cpu_s']:.2f}x "
              f"a forward ({forward['cpu_s']:.1f} s CPU)", flush=True)
    if args.cost_only:
        summary = {"model": source.model_id, "calibration_tokens": calibration.tokens, "forward": forward,
                   "probe_cost": {mode: c["cpu_s"] / forward["cpu_s"] for mode, c in cost.items()},
                   "analysis": cost, "machine": _machine()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
        return
    table = tables["fisher+context"]
    tables.setdefault("fisher", table)  # the same Fisher columns; auto picks fisher from a table without context

    heldout = load_calibration(tokenizer, "heldout", args.heldout, args.seq_len)
    reference = heldout_reference(model, heldout.input_ids)
    cache = QuantCache(model, NF4)
    rows_nf4 = table.for_format("nf4")
    candidates = set(rows_nf4.loc[rows_nf4["quantizable"], "name"])

    def kld(kept) -> float:
        return measure_variants(reference, cache, {"v": sorted(candidates - set(kept))})["v"].summary()["mean_kld"]

    all_nf4 = kld({n for n in candidates if n.endswith("lm_head")})
    shared = {"reference": KLReference(model, calibration), "cache": cache, "progress": False}
    single = _single_module_scores(model, calibration, table, cache, args) if args.single_module else {}
    results = []

    def add(budget, label, p, seconds=None):
        results.append(_row(budget, label, p.kept, kld(set(p.kept)), all_nf4, p.predicted.bytes, seconds))
        print(_line(results[-1]), flush=True)

    for budget in BUDGETS:
        for objective in OBJECTIVES:
            add(budget, f"planner: {objective}", plan(table, budget, objective=objective))
        for label, gains in single.items():
            add(budget, label, plan(table, budget, scores={"nf4": gains}))
        if args.refine:
            started = time.process_time()
            refined = refine(table, budget, model, calibration, rounds=args.refine, **shared)
            add(budget, f"refined ({args.refine} rounds)", refined, time.process_time() - started)
        shipped = verify(tables["fisher"], plan(tables["fisher"], budget, objective="fisher"), model, calibration,
                         **shared)
        add(budget, f"shipped (auto + verify: {shipped.checks.verification.chosen})", shipped)
        for keep in baseline_keep_sets(table, plan(table, budget, objective="fisher")):
            label = keep.label.split(" @ ")[0] + (f" (seed {keep.seed})" if keep.seed is not None else "")
            results.append(_row(budget, label, keep.kept, kld(set(keep.kept)), all_nf4, keep.bytes))
            print(_line(results[-1]), flush=True)
    summary = {
        "model": source.model_id, "calibration_tokens": calibration.tokens, "heldout_tokens": heldout.tokens,
        "all_nf4_kld": all_nf4, "forward": forward,
        "probe_cost": {mode: c["cpu_s"] / forward["cpu_s"] for mode, c in cost.items()} if not args.no_cost else {},
        "analysis": cost,
        "single_module_windows": args.single_windows if single else None,
        "rows": results, "machine": _machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(markdown(summary))


def _single_module_scores(model, calibration, table, cache, args) -> dict[str, dict[str, float]]:
    """Exact calibration-KL effect of each module alone: restored into all-NF4, and quantized alone (N forwards)."""
    subset = CalibrationSet(calibration.input_ids[: args.single_windows], calibration.source, calibration.seed)
    reference = KLReference(model, subset)
    rows = table.for_format("nf4")
    names = list(rows.loc[rows["quantizable"] & (rows["group"] != "lm_head"), "name"])
    restore, alone = {}, {}
    everything = calibration_kld(reference, cache, names)  # all-NF4; each module in turn back to 16-bit
    for name in names:
        restore[name] = everything - calibration_kld(reference, cache, [n for n in names if n != name])
    for index, name in enumerate(names):
        alone[name] = calibration_kld(reference, cache, [name])
        if index % 20 == 0:
            print(f"single-module scores: {index + 1}/{len(names)}", flush=True)
    return {"restore one into all-NF4 (N forwards)": restore, "quantize one alone (N forwards)": alone}


def _row(budget, label, kept, value, all_nf4, size, seconds=None) -> dict:
    row = {"budget": budget, "score": label, "kept": len(kept), "kld": value,
           "recovery": (all_nf4 - value) / all_nf4, "bytes": int(size)}
    if seconds is not None:
        row["cpu_seconds"] = seconds
    return row


def _line(row) -> str:
    return f"{row['budget']:>5} {row['score']:<44} kept {row['kept']:>3}  KLD {row['kld']:.4f}  recovery {row['recovery']:.0%}"


def markdown(summary: dict) -> str:
    """The results as a Markdown table (random seeds averaged)."""
    cost = ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in summary["probe_cost"].items())
    lines = [f"all-NF4 KLD {summary['all_nf4_kld']:.4f}; analysis cost (CPU time / one forward): {cost}",
             "", "| budget | score | kept | KLD | recovery |", "|---|---|---|---|---|"]
    for budget in BUDGETS:
        part = [r for r in summary["rows"] if r["budget"] == budget]
        randoms = [r for r in part if r["score"].startswith("random")]
        for r in part:
            if not r["score"].startswith("random"):
                lines.append(f"| {budget} | {r['score']} | {r['kept']} | {r['kld']:.4f} | {r['recovery']:.0%} |")
        if randoms:
            kept, mean, recovery = random_mean(randoms, summary["all_nf4_kld"])
            lines.append(f"| {budget} | random (mean of {len(randoms)}) | {kept} | {mean:.4f} | {recovery:.0%} |")
    return "\n".join(lines)


def random_mean(randoms: list[dict], all_nf4: float) -> tuple[int, float, float]:
    """(kept, mean KLD, recovery) of the random-keep rows (one per seed), as the tables print them."""
    mean = float(np.mean([r["kld"] for r in randoms]))
    return randoms[0]["kept"], mean, (all_nf4 - mean) / all_nf4


def add_analysis_arguments(parser) -> None:
    """The analysis options the plan benchmarks share: --no-equalize and --fisher-samples, as quantplan run has them."""
    parser.add_argument("--no-equalize", dest="equalize", action="store_false",
                        help="analyze the source weights as they are (quantplan run --no-equalize); by default the "
                             "analysis scales channels first, as quantplan run does, and recovery is also counted "
                             "from plain all-NF4 of the source weights")
    parser.add_argument("--fisher-samples", type=int, default=None,
                        help="calibration windows the Fisher pass runs backward on (default: quantplan run's, a "
                             "quarter of the windows and at least 8; --samples or more: every window)")


def reused_table(folder, calibration, batch_size: int = 4, fisher_samples: int | None = None) -> SensitivityTable:
    """The table saved in ``folder``, refused where its Fisher pass backpropagated other windows than this run's
    analysis would (a table cached before the default changed would measure something else)."""
    from quantplan.analysis.fisher_windows import backward_share

    table = SensitivityTable.load(folder)
    saved = table.meta.get("fisher_samples", table.meta["calibration"].get("samples"))
    wanted = backward_share(calibration, batch_size, fisher_samples).windows
    if table.meta.get("fisher") and saved != wanted:
        raise SystemExit(f"{folder}: its table backpropagated {saved} calibration windows and this run {wanted}: pass "
                         f"--fisher-samples {saved}, or another --table folder")
    return table


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _forward_cost(model, calibration, batch_size: int = 4) -> dict:
    """Best of two plain forward passes over the calibration tokens (logits of the last position only)."""
    best = None
    for _ in range(2):
        def run():
            with torch.inference_mode():
                for batch in calibration.batches(batch_size):
                    model(**batch, use_cache=False, logits_to_keep=1)
        _, cost = _timed(run)
        best = cost if best is None or cost["cpu_s"] < best["cpu_s"] else best
    return best


def _machine() -> dict:
    import os
    import platform

    import bitsandbytes
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
