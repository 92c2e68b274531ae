"""Plan quality on SmolLM2-135M: how much of the all-NF4 KL gap each way of choosing 16-bit modules closes.

For each budget (+10 %, +33 % over all-NF4) and each score (the planner's objectives, plus the
heuristic baselines at the same bytes), the chosen modules stay 16-bit and every other Linear
is NF4 (simulated: bitsandbytes' round-tripped weights, which is what Linear4bit computes on
CPU). Mean next-token KL divergence vs the 16-bit model is measured on held-out text disjoint
from the calibration text; recovery = share of the all-NF4 KL closed. Also reported: the probe
cost (analysis time with and without the Fisher backward pass / a plain forward over the same
calibration tokens).

    python benchmarks/plan_quality.py [--samples 32] [--seq-len 256] [--heldout 16]

Writes benchmarks/results/plan_quality.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from analysis.simulate import QuantCache  # noqa: E402
from planner import plan  # noqa: E402
from planner.baselines import baseline_keep_sets  # noqa: E402
from reports.fidelity import Reference, measure  # noqa: E402

OBJECTIVES = ("output", "weight", "combined", "fisher")
BUDGETS = ("+10%", "+33%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_quality.json"))
    args = parser.parse_args()

    source = resolve_source(None)
    model, tokenizer = load_model(source), load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    forward = _forward_seconds(model, calibration)
    started = time.perf_counter()
    plain = analyze(model, calibration, [NF4], progress=False, model_fingerprint=source.fingerprint)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    table = analyze(model, calibration, [NF4], progress=False, model_fingerprint=source.fingerprint, fisher=True)
    fisher_seconds = time.perf_counter() - started
    assert np.allclose(plain.df["output_rel_error"].fillna(0), table.df["output_rel_error"].fillna(0))

    heldout = load_calibration(tokenizer, "heldout", args.heldout, args.seq_len)
    reference = Reference(model, heldout.input_ids)
    cache = QuantCache(model, NF4)
    rows = table.for_format("nf4")
    candidates = list(rows.loc[rows["quantizable"], "name"])

    def kld(kept) -> float:
        with cache.quantized([n for n in candidates if n not in kept]):
            return measure(model, reference).summary()["mean_kld"]

    all_nf4 = kld(set())
    results = []
    for budget in BUDGETS:
        for objective in OBJECTIVES:
            p = plan(table, budget, objective=objective)
            results.append(_row(budget, f"planner: {objective}", p.kept, kld(set(p.kept)), all_nf4,
                                p.predicted["bytes"]))
            print(_line(results[-1]), flush=True)
        reference_plan = plan(table, budget, objective="fisher")
        for keep in baseline_keep_sets(table, reference_plan):
            results.append(_row(budget, keep.label.split(" @ ")[0] + (f" (seed {keep.seed})" if keep.seed is not None else ""),
                                keep.kept, kld(set(keep.kept)), all_nf4, keep.bytes))
            print(_line(results[-1]), flush=True)
    summary = {
        "model": source.model_id, "calibration_tokens": calibration.tokens, "heldout_tokens": heldout.tokens,
        "all_nf4_kld": all_nf4, "forward_seconds": forward,
        "probe_cost": {"output_only": plain_seconds / forward, "with_fisher": fisher_seconds / forward},
        "rows": results, "machine": _machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(markdown(summary))


def _row(budget, label, kept, value, all_nf4, size) -> dict:
    return {"budget": budget, "score": label, "kept": len(kept), "kld": value,
            "recovery": (all_nf4 - value) / all_nf4, "bytes": int(size)}


def _line(row) -> str:
    return f"{row['budget']:>5} {row['score']:<28} kept {row['kept']:>3}  KLD {row['kld']:.4f}  recovery {row['recovery']:.0%}"


def markdown(summary: dict) -> str:
    """The results as a Markdown table (random seeds averaged)."""
    lines = [f"all-NF4 KLD {summary['all_nf4_kld']:.4f}; probe cost {summary['probe_cost']['output_only']:.2f}x "
             f"(output error) / {summary['probe_cost']['with_fisher']:.2f}x (with Fisher) one forward pass",
             "", "| budget | score | kept | KLD | recovery |", "|---|---|---|---|---|"]
    rows = summary["rows"]
    for budget in BUDGETS:
        part = [r for r in rows if r["budget"] == budget]
        randoms = [r for r in part if r["score"].startswith("random")]
        for r in part:
            if not r["score"].startswith("random"):
                lines.append(f"| {budget} | {r['score']} | {r['kept']} | {r['kld']:.4f} | {r['recovery']:.0%} |")
        if randoms:
            mean = float(np.mean([r["kld"] for r in randoms]))
            lines.append(f"| {budget} | random (mean of {len(randoms)}) | {randoms[0]['kept']} | {mean:.4f} | "
                         f"{(summary['all_nf4_kld'] - mean) / summary['all_nf4_kld']:.0%} |")
    return "\n".join(lines)


def _forward_seconds(model, calibration, batch_size: int = 4) -> float:
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in calibration.batches(batch_size):
                model(**batch, use_cache=False, logits_to_keep=1)
        best = min(best, time.perf_counter() - started)
    return best


def _machine() -> dict:
    import os
    import platform

    import bitsandbytes
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
