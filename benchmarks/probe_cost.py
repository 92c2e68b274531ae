"""How much does analyze() cost compared with simply running the calibration tokens through the model?

On the offline default model (SmolLM2-135M, bf16, CPU) this times, over the very same
calibration batches:

* ``forward``: a plain forward pass (``torch.inference_mode()``, the forward keyword arguments
  analyze() itself passes: ``use_cache=False, logits_to_keep=1``), no hooks;
* ``analyze(...)`` with one format (nf4) and with three (nf4, fp4, int8), split into the
  calibration pass (``_run_calibration``: forward + streaming Gram-matrix hooks) and the
  per-module measurement phase (``measure_module``: bitsandbytes round trip + error from the
  Gram matrix), both timed by wrapping the library's functions at run time (the library is
  not modified).

Every timing is the best of ``--repeats`` runs after a warm-up (one forward, one round trip per
format). Results go to
``benchmarks/results/probe_cost.json``; targets are reported, not asserted:
analysis <= 2.0x the plain forward for one format, and each extra format <= +10 %.

    python benchmarks/probe_cost.py [--model FOLDER] [--samples 16] [--seq-len 256] [--repeats 3] [--max-seconds 270]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from quantplan.analysis import (  # noqa: E402
    analyze,
    load_calibration,
    load_model,
    load_processor,
    parse_formats,
    resolve_source,
)
from quantplan.analysis.formats import FourBit, Int8  # noqa: E402
from quantplan.common.batches import batch_to  # noqa: E402

# ``analysis.analyze`` is shadowed by the function of that name in the package namespace.
analyze_module = importlib.import_module("quantplan.analysis.analyze")
measure_mod = importlib.import_module("quantplan.analysis.measure")

RESULTS = Path(__file__).resolve().parent / "results" / "probe_cost.json"
TARGET_ONE_FORMAT = 2.0
TARGET_PER_EXTRA_FORMAT = 0.10
FORMAT_SETS = ("nf4", "nf4,fp4,int8")


def forward_options(model) -> dict:
    """The keyword arguments analyze() passes to the model's forward (lm_head not measured)."""
    return analyze_module._forward_options(model, full_logits=False)


def plain_forward(model, calibration, batch_size: int, options: dict) -> dict:
    device = next(model.parameters()).device
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in calibration.batches(batch_size):
            model(**batch_to(batch, device), **options)
    return {"total": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "loadavg_1min_before": os.getloadavg()[0]}


# (owner, attribute, key): functions wrapped with timers while analyze() runs. The measure-phase
# parts are disjoint: bitsandbytes round trip, diag(M G M^T) from the Gram matrix in float64
# (reference energy and each format's error), weight outlier statistics, input statistics; what
# is left of measure_module (weight/delta norms, sample max error, ...) is "rest".
_TIMED = [
    (analyze_module, "_run_calibration", "calibration"),
    (analyze_module, "measure_module", "measure"),
    (FourBit, "roundtrip", "measure.bnb_roundtrip"),
    (Int8, "roundtrip", "measure.bnb_roundtrip"),
    (measure_mod, "_per_output", "measure.gram_quadratic"),
    (measure_mod, "weight_outlier_columns", "measure.weight_stats"),
    (measure_mod, "input_columns", "measure.input_stats"),
]


@contextmanager
def instrumented():
    """Wrap analyze's calibration pass and measurement parts with timers (restored on exit)."""
    times = defaultdict(float)
    calls = defaultdict(int)
    timed = [t for t in _TIMED if t[1] in t[0].__dict__]  # the library may have renamed a part
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in timed]

    def wrap(fn, key):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - start
                calls[key] += 1
        return timed

    for (owner, attr, key), (_, _, fn) in zip(timed, originals, strict=True):
        setattr(owner, attr, wrap(fn, key))
    try:
        yield times, calls
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def analyze_once(model, calibration, formats, batch_size: int, fingerprint: str) -> dict:
    load_before = os.getloadavg()[0]
    with instrumented() as (times, calls):
        start, cpu = time.perf_counter(), time.process_time()
        table = analyze(model, calibration, formats, model_fingerprint=fingerprint, batch_size=batch_size,
                        progress=False)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    parts = {k.removeprefix("measure."): v for k, v in times.items() if k.startswith("measure.")}
    parts["rest"] = times["measure"] - sum(parts.values())
    return {"total": total, "cpu": cpu, "calibration": times["calibration"], "measure": times["measure"],
            "other": total - times["calibration"] - times["measure"], "measure_parts": parts,
            "modules_measured": calls["measure"], "roundtrips": calls["measure.bnb_roundtrip"],
            "rows": len(table.df), "loadavg_1min_before": load_before}


def best(runs: list[dict], key: str = "total") -> dict:
    return min(runs, key=lambda r: r[key])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="as analyze()'s default")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--max-seconds", type=float, default=270.0,
                        help="start no further repeat after this much wall time (at least one always runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.getloadavg()[0] > 0.5:
        print(f"note: 1-minute load average is {os.getloadavg()[0]:.1f} before starting: other processes "
              f"compete for the CPUs and will inflate the timings", flush=True)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    wall = time.perf_counter()

    source = resolve_source(args.model)
    model = load_model(source)
    tokenizer = load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    options = forward_options(model)
    print(f"model {source.model_id} ({next(model.parameters()).dtype}), {calibration.tokens} tokens "
          f"({args.samples} x {args.seq_len}), batch {args.batch_size}, {threads} threads, forward kwargs {options}",
          flush=True)

    # warm-up: one forward, and every format's bitsandbytes round trip plus the Gram-matrix error
    # on one real weight (first calls import bitsandbytes and pick its kernels); a whole warm-up
    # analyze() would cost as much as a timed one, since its measurement phase does not depend
    # on the number of calibration tokens
    plain_forward(model, calibration, args.batch_size, options)
    weight = next(p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight"))
    for fmt in parse_formats("nf4,fp4,int8"):
        restored, _ = fmt.roundtrip(weight.detach())
        measure_mod._per_output(weight.detach().float() - restored.float(),
                                torch.eye(weight.shape[1], dtype=torch.float64))

    # interleave the measurements so slow drift of the machine affects them alike
    forward_runs: list[dict] = []
    analyze_runs: dict[str, list[dict]] = {spec: [] for spec in FORMAT_SETS}
    for repeat in range(args.repeats):
        if repeat and time.perf_counter() - wall > args.max_seconds:
            print(f"stopping after {repeat} repeats: --max-seconds {args.max_seconds:.0f} reached", flush=True)
            break
        forward_runs.append(plain_forward(model, calibration, args.batch_size, options))
        for spec in FORMAT_SETS:
            analyze_runs[spec].append(analyze_once(model, calibration, parse_formats(spec), args.batch_size,
                                                   source.fingerprint))
        print(f"repeat {repeat + 1}/{args.repeats}: forward {forward_runs[-1]['total']:.2f}s, "
              + ", ".join(f"analyze[{s}] {analyze_runs[s][-1]['total']:.2f}s" for s in FORMAT_SETS)
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)

    forward = min(r["total"] for r in forward_runs)
    forward_cpu = min(r["cpu"] for r in forward_runs)
    results = {}
    for spec in FORMAT_SETS:
        runs = analyze_runs[spec]
        b = best(runs)
        results[spec] = {
            "formats": spec.split(","),
            "best": b,
            "best_calibration_s": min(r["calibration"] for r in runs),
            "best_measure_s": min(r["measure"] for r in runs),
            "runs": runs,
            "ratio_total": b["total"] / forward,
            "ratio_calibration_pass": min(r["calibration"] for r in runs) / forward,
            "best_cpu_s": min(r["cpu"] for r in runs),
            "ratio_cpu": min(r["cpu"] for r in runs) / forward_cpu,
        }
    one, three = results["nf4"], results["nf4,fp4,int8"]
    extra_formats = len(three["formats"]) - len(one["formats"])
    per_extra_s = (three["best"]["total"] - one["best"]["total"]) / extra_formats
    per_extra_measure_s = (three["best_measure_s"] - one["best_measure_s"]) / extra_formats
    summary = {
        "forward_s": forward,
        "forward_cpu_s": forward_cpu,
        "ratio_1_format_cpu": one["ratio_cpu"],
        "ratio_3_formats_cpu": three["ratio_cpu"],
        # the calibration pass does not depend on the formats: the increment from best measure phases
        "per_extra_format_from_measure_vs_1_format_analysis": per_extra_measure_s / one["best"]["total"],
        "ratio_1_format": one["ratio_total"],
        "ratio_3_formats": three["ratio_total"],
        "hook_overhead_ratio": one["best_calibration_s"] / forward,  # calibration pass / plain forward
        "per_extra_format_s": per_extra_s,
        "per_extra_format_vs_1_format_analysis": per_extra_s / one["best"]["total"],
        "per_extra_format_vs_forward": per_extra_s / forward,
        "per_extra_format_measure_s": per_extra_measure_s,
        "target_ratio_1_format": TARGET_ONE_FORMAT,
        "target_per_extra_format": TARGET_PER_EXTRA_FORMAT,
        "meets_ratio_target": one["ratio_total"] <= TARGET_ONE_FORMAT,
        "meets_per_extra_format_target": per_extra_s / one["best"]["total"] <= TARGET_PER_EXTRA_FORMAT,
    }
    report = {
        "benchmark": "probe_cost",
        "machine": machine_info(threads),
        "model": {"id": source.model_id, "fingerprint": source.fingerprint,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "params": sum(p.numel() for p in model.parameters())},
        "calibration": {**calibration.meta, "batch_size": args.batch_size},
        "forward_kwargs": options,
        "repeats_requested": args.repeats,
        "repeats_done": len(forward_runs),
        "forward_runs": forward_runs,
        "analyze": results,
        "summary": summary,
        "loadavg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print()
    print(f"{'run':<26}{'total s':>9}{'calib s':>9}{'measure s':>11}{'other s':>9}{'x forward':>11}"
          f"{'CPU s':>9}{'x fwd CPU':>11}")
    print(f"{'plain forward':<26}{forward:>9.2f}{'':>9}{'':>11}{'':>9}{1.0:>11.2f}{forward_cpu:>9.2f}{1.0:>11.2f}")
    for spec in FORMAT_SETS:
        r = results[spec]
        b = r["best"]
        print(f"{'analyze ' + spec:<26}{b['total']:>9.2f}{b['calibration']:>9.2f}{b['measure']:>11.2f}"
              f"{b['other']:>9.2f}{r['ratio_total']:>11.2f}{r['best_cpu_s']:>9.2f}{r['ratio_cpu']:>11.2f}")
    print()
    parts = list(one["best"]["measure_parts"])
    print(f"{'measure phase, s':<26}" + "".join(f"{p:>16}" for p in parts))
    for spec in FORMAT_SETS:
        b = results[spec]["best"]
        print(f"{'analyze ' + spec:<26}" + "".join(f"{b['measure_parts'][p]:>16.2f}" for p in parts))
    print()
    print(f"calibration pass (forward + hooks) / plain forward: {summary['hook_overhead_ratio']:.2f}x")
    print(f"analysis / forward, 1 format:  {summary['ratio_1_format']:.2f}x  (target <= {TARGET_ONE_FORMAT:.1f}x: "
          f"{'met' if summary['meets_ratio_target'] else 'MISSED'})")
    print(f"analysis / forward, 3 formats: {summary['ratio_3_formats']:.2f}x")
    print(f"CPU-time ratios (less sensitive to other load): 1 format {summary['ratio_1_format_cpu']:.2f}x, "
          f"3 formats {summary['ratio_3_formats_cpu']:.2f}x")
    print(f"per extra format from the measure phase alone: +{per_extra_measure_s:.2f}s = "
          f"+{100 * summary['per_extra_format_from_measure_vs_1_format_analysis']:.1f}% of the 1-format analysis")
    print(f"per extra format: +{per_extra_s:.2f}s = +{100 * summary['per_extra_format_vs_1_format_analysis']:.1f}% "
          f"of the 1-format analysis (+{summary['per_extra_format_vs_forward']:.2f}x forward; target <= "
          f"+{100 * TARGET_PER_EXTRA_FORMAT:.0f}%: {'met' if summary['meets_per_extra_format_target'] else 'MISSED'})")
    print(f"wrote {args.out} (wall {report['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
