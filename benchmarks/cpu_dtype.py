"""Which dtype should the analysis run in on a CPU: the time and the plan of bf16 against fp32.

``--dtype auto`` (quantplan's default) runs fp32 on a CPU without native bf16 (oneDNN's check). This
analyzes the offline default model (SmolLM2-135M) in both dtypes on the same calibration tokens (the
default analysis: Fisher scores, the nf4 / nf4-bs32 menu), one torch thread each, then plans both
tables at ``--budget`` and compares: analysis CPU seconds, the ratio, the modules each plan keeps and
how many choices differ, and the rank correlation of the two tables' Fisher errors.

    python benchmarks/cpu_dtype.py [--samples 4] [--seq-len 128] [--budget +10%] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from quantplan.analysis import analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from quantplan.analysis.config import DEFAULT_FORMATS  # noqa: E402
from quantplan.analysis.formats import parse_formats  # noqa: E402
from quantplan.analysis.models import dtype_from_name  # noqa: E402
from quantplan.planner.config import PlanConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_dtype.json"


def analyzed(source, calibration, dtype: str):
    """(table, CPU seconds, wall seconds) of the default analysis in ``dtype``."""
    model = load_model(source, dtype=dtype_from_name(dtype))
    start, cpu = time.perf_counter(), time.process_time()
    table = analyze(model, calibration, parse_formats(DEFAULT_FORMATS), model_fingerprint=source.fingerprint,
                    progress=False, fisher=True)
    return table, time.process_time() - cpu, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budget", default="+10%")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source = resolve_source(args.model)
    calibration = load_calibration(load_processor(source), None, args.samples, args.seq_len)
    runs, plans, errors = {}, {}, {}
    for dtype in ("fp32", "bf16"):
        table, cpu, wall = analyzed(source, calibration, dtype)
        plans[dtype] = PlanConfig().plan(table, args.budget)
        rows = table.for_format("nf4").set_index("name")
        errors[dtype] = rows["output_fisher_error"].dropna()
        runs[dtype] = {"analysis_cpu_s": cpu, "analysis_wall_s": wall, "kept": sorted(plans[dtype].kept),
                       "choices": plans[dtype].choices}
        print(f"{dtype}: analysis {cpu:.1f} CPU s, plan keeps {len(plans[dtype].kept)}", flush=True)
    differ = sorted(n for n in plans["fp32"].choices if plans["fp32"].choices[n] != plans["bf16"].choices.get(n))
    common = errors["fp32"].index.intersection(errors["bf16"].index)
    spearman = float(errors["fp32"][common].rank().corr(errors["bf16"][common].rank()))
    result = {"benchmark": "cpu_dtype", "machine": machine_info(1), "calibration": calibration.meta,
              "budget": args.budget, "runs": runs,
              "bf16_over_fp32_cpu": runs["bf16"]["analysis_cpu_s"] / runs["fp32"]["analysis_cpu_s"],
              "choices_differing": differ, "modules": len(plans["fp32"].choices),
              "fisher_error_spearman": spearman}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bf16 / fp32 analysis CPU time: {result['bf16_over_fp32_cpu']:.2f}x; plans differ in {len(differ)} of "
          f"{result['modules']} choices; Spearman of the Fisher errors {spearman:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
