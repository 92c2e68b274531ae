"""How much does analyze() cost compared with simply running the calibration tokens through the model?

On the offline default model (SmolLM2-135M, CPU, ``--dtype auto``: fp32 on a CPU without native bf16) this
times, over the very same calibration batches:

* ``forward``: a plain forward pass (``torch.inference_mode()``, the forward keyword arguments
  analyze() itself passes: ``use_cache=False, logits_to_keep=1``), no hooks;
* ``analyze(...)`` with one format (nf4) and with the default blocksize menu (nf4, nf4-bs32), each with
  output-error scores only and with Fisher scores (the default: a backward pass on the first batches, as many as
  ``quantplan run`` backpropagates by default, ``analysis.fisher_windows.default_windows``; one more run backpropagates
  every batch, as sessions 9-17's default did), split into
  the calibration pass (``_run_calibration``: forward [+ backward] + streaming Gram-matrix hooks) and the
  per-module measurement phase (``measure_module``: bitsandbytes round trip + error from the Gram
  matrix), both timed by wrapping the library's functions at run time (the library is not modified).

Every timing is the best of ``--repeats`` runs after a warm-up (one forward, one round trip per
format). Results go to ``benchmarks/results/probe_cost.json``; targets (issue #15) are reported, not
asserted: output-error analysis <= 2.0x the plain forward, Fisher analysis <= 4.0x, the menu's second
entry <= +10 %.

    python benchmarks/probe_cost.py [--model FOLDER] [--samples 16] [--seq-len 256] [--repeats 3] [--max-seconds 270]
        [--threads N] [--dtype auto] [--device cpu|cuda]

With ``--device cuda`` the model and every batch live on the GPU and each timing waits for the GPU
(``torch.cuda.synchronize``) before it stops.
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
from quantplan.analysis.equalize import apply_equalization, equalization_of  # noqa: E402
from quantplan.analysis.fisher_windows import default_windows  # noqa: E402
from quantplan.analysis.formats import FourBit, Int8  # noqa: E402
from quantplan.analysis.gram import UpperGram, product_dtype  # noqa: E402
from quantplan.analysis.models import dtype_from_name, resolve_dtype  # noqa: E402
from quantplan.common.batches import batch_to  # noqa: E402

# ``analysis.analyze`` is shadowed by the function of that name in the package namespace.
analyze_module = importlib.import_module("quantplan.analysis.analyze")
measure_mod = importlib.import_module("quantplan.analysis.measure")

RESULTS = Path(__file__).resolve().parent / "results" / "probe_cost.json"
TARGET_OUTPUT = 2.0  # output-error analysis / plain forward
TARGET_FISHER = 4.0  # Fisher analysis (the default) / plain forward
TARGET_PER_EXTRA_FORMAT = 0.10
#: label -> (formats, Fisher scores, channel equalization, backward on every window): one format and the blocksize
#: menu, each without and with Fisher (backpropagating the windows `quantplan run` does by default,
#: analysis.fisher_windows.default_windows), `quantplan run`'s default analysis (the Fisher menu after its equalization stage,
#: analysis.equalize), and the one-format Fisher analysis backpropagating every window (sessions 9-17's default)
RUNS = {"output nf4": ("nf4", False, False, False), "output menu": ("nf4,nf4-bs32", False, False, False),
        "fisher nf4": ("nf4", True, False, False), "fisher menu": ("nf4,nf4-bs32", True, False, False),
        "default (menu + equalize)": ("nf4,nf4-bs32", True, True, False),
        "fisher nf4, every window": ("nf4", True, False, True)}


def forward_options(model) -> dict:
    """The keyword arguments analyze() passes to the model's forward (lm_head not measured)."""
    return analyze_module._forward_options(model, full_logits=False)


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so a wall-clock timing covers it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def plain_forward(model, calibration, batch_size: int, options: dict) -> dict:
    device = next(model.parameters()).device
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in calibration.batches(batch_size):
            model(**batch_to(batch, device), **options)
    synchronize(device)
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
    (measure_mod, "weight_moments", "measure.weight_stats"),
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


def analyze_once(model, calibration, formats, batch_size: int, fingerprint: str, fisher: bool,
                 equalize: bool = False, fisher_samples: int | None = None) -> dict:
    """One timed analyze() (with ``equalize``, the model's scales are undone afterwards: every run measures the same
    weights; ``fisher_samples``: the windows backpropagated, None analyze()'s default)."""
    load_before = os.getloadavg()[0]
    device = next(model.parameters()).device
    with instrumented() as (times, calls):
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        table = analyze(model, calibration, formats, model_fingerprint=fingerprint, batch_size=batch_size,
                        progress=False, fisher=fisher, equalize=equalize, fisher_samples=fisher_samples)
        synchronize(device)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    apply_equalization(model, equalization_of(table.meta), inverse=True)
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
    parser.add_argument("--dtype", default="auto", help="as quantplan's --dtype (auto: fp32 on a CPU without bf16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model, batches and measurement run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.getloadavg()[0] > 0.5:
        print(f"note: 1-minute load average is {os.getloadavg()[0]:.1f} before starting: other processes "
              f"compete for the CPUs and will inflate the timings", flush=True)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    wall = time.perf_counter()

    source = resolve_source(args.model)
    model = load_model(source, dtype=dtype_from_name(resolve_dtype(args.dtype, args.device)), device=args.device)
    tokenizer = load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    options = forward_options(model)
    fisher_windows = default_windows(args.samples)  # what quantplan run backpropagates
    print(f"model {source.model_id} ({next(model.parameters()).dtype}), {calibration.tokens} tokens "
          f"({args.samples} x {args.seq_len}), batch {args.batch_size}, {threads} threads, forward kwargs {options}",
          flush=True)

    # warm-up: one forward, and every format's bitsandbytes round trip plus the Gram-matrix error
    # on one real weight (first calls import bitsandbytes and pick its kernels); a whole warm-up
    # analyze() would cost as much as a timed one, since its measurement phase does not depend
    # on the number of calibration tokens
    plain_forward(model, calibration, args.batch_size, options)
    weight = next(p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight"))
    for fmt in parse_formats("nf4,nf4-bs32"):
        restored, _ = fmt.roundtrip(weight.detach())
        measure_mod._per_output(weight.detach().float() - restored.float(),
                                UpperGram.from_matrix(torch.eye(weight.shape[1], device=weight.device), weight.shape[1]),
                                product_dtype(weight))

    # interleave the measurements so slow drift of the machine affects them alike
    forward_runs: list[dict] = []
    analyze_runs: dict[str, list[dict]] = {label: [] for label in RUNS}
    for repeat in range(args.repeats):
        if repeat and time.perf_counter() - wall > args.max_seconds:
            print(f"stopping after {repeat} repeats: --max-seconds {args.max_seconds:.0f} reached", flush=True)
            break
        forward_runs.append(plain_forward(model, calibration, args.batch_size, options))
        for label, (spec, fisher, equalize, every) in RUNS.items():
            analyze_runs[label].append(analyze_once(model, calibration, parse_formats(spec), args.batch_size,
                                                    source.fingerprint, fisher, equalize,
                                                    args.samples if every else None))
        print(f"repeat {repeat + 1}/{args.repeats}: forward {forward_runs[-1]['total']:.2f}s, "
              + ", ".join(f"{label} {analyze_runs[label][-1]['total']:.2f}s" for label in RUNS)
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)

    forward = min(r["total"] for r in forward_runs)
    forward_cpu = min(r["cpu"] for r in forward_runs)
    results = {label: _result(RUNS[label], runs, forward, forward_cpu) for label, runs in analyze_runs.items()}
    summary = _summary(results, forward, forward_cpu)
    report = {
        "benchmark": "probe_cost",
        "machine": machine_info(threads),
        "model": {"id": source.model_id, "fingerprint": source.fingerprint,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "params": sum(p.numel() for p in model.parameters())},
        "calibration": {**calibration.meta, "batch_size": args.batch_size, "fisher_windows": fisher_windows},
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
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
    _print(results, summary, forward, forward_cpu)
    print(f"wrote {args.out} (wall {report['wall_s']:.0f}s)")
    return 0



def _result(run: tuple[str, bool, bool, bool], runs: list[dict], forward: float, forward_cpu: float) -> dict:
    """One analysis configuration's best timings and its ratios to the plain forward."""
    spec, fisher, equalize, every = run
    b = best(runs)
    return {"formats": spec.split(","), "fisher": fisher, "equalize": equalize, "every_window": every,
            "best": b, "runs": runs,
            "best_calibration_s": min(r["calibration"] for r in runs),
            "best_measure_s": min(r["measure"] for r in runs),
            "ratio_total": b["total"] / forward,
            "ratio_calibration_pass": min(r["calibration"] for r in runs) / forward,
            "best_cpu_s": min(r["cpu"] for r in runs),
            "ratio_cpu": min(r["cpu"] for r in runs) / forward_cpu}


def _summary(results: dict, forward: float, forward_cpu: float) -> dict:
    """The issue's targets: output analysis <= 2x forward, Fisher <= 4x, each extra format <= +10 %."""
    out, fisher = results["output nf4"], results["fisher nf4"]
    extra = {mode: (results[f"{mode} menu"]["best"]["total"] - results[f"{mode} nf4"]["best"]["total"])
             / results[f"{mode} nf4"]["best"]["total"] for mode in ("output", "fisher")}
    return {"forward_s": forward, "forward_cpu_s": forward_cpu,
            "ratio_output": out["ratio_total"], "ratio_output_cpu": out["ratio_cpu"],
            "ratio_fisher": fisher["ratio_total"], "ratio_fisher_cpu": fisher["ratio_cpu"],
            "ratio_default": results["default (menu + equalize)"]["ratio_total"],
            "ratio_default_cpu": results["default (menu + equalize)"]["ratio_cpu"],
            "ratio_menu_without_equalize": results["fisher menu"]["ratio_total"],
            "ratio_fisher_every_window": results["fisher nf4, every window"]["ratio_total"],
            "equalize_extra": (results["default (menu + equalize)"]["best"]["total"]
                               - results["fisher menu"]["best"]["total"]) / results["fisher menu"]["best"]["total"],
            "hook_overhead_ratio": out["ratio_calibration_pass"],  # output-only calibration pass / forward
            "menu_extra_output": extra["output"], "menu_extra_fisher": extra["fisher"],
            "targets": {"output": TARGET_OUTPUT, "fisher": TARGET_FISHER, "per_extra_format": TARGET_PER_EXTRA_FORMAT},
            "meets_output": out["ratio_total"] <= TARGET_OUTPUT, "meets_fisher": fisher["ratio_total"] <= TARGET_FISHER,
            "meets_per_extra_format": max(extra.values()) <= TARGET_PER_EXTRA_FORMAT}


def _print(results: dict, summary: dict, forward: float, forward_cpu: float) -> None:
    print()
    print(f"{'run':<22}{'total s':>9}{'calib s':>9}{'measure s':>11}{'other s':>9}{'x forward':>11}"
          f"{'CPU s':>9}{'x fwd CPU':>11}")
    print(f"{'plain forward':<22}{forward:>9.2f}{'':>9}{'':>11}{'':>9}{1.0:>11.2f}{forward_cpu:>9.2f}{1.0:>11.2f}")
    for label, r in results.items():
        b = r["best"]
        print(f"{label:<22}{b['total']:>9.2f}{b['calibration']:>9.2f}{b['measure']:>11.2f}"
              f"{b['other']:>9.2f}{r['ratio_total']:>11.2f}{r['best_cpu_s']:>9.2f}{r['ratio_cpu']:>11.2f}")
    print()
    parts = list(results["output nf4"]["best"]["measure_parts"])
    print(f"{'measure phase, s':<22}" + "".join(f"{p:>16}" for p in parts))
    for label, r in results.items():
        print(f"{label:<22}" + "".join(f"{r['best']['measure_parts'].get(p, 0.0):>16.2f}" for p in parts))
    print()
    t = summary["targets"]
    print(f"output-error analysis / forward: {summary['ratio_output']:.2f}x (target <= {t['output']:.1f}x: "
          f"{'met' if summary['meets_output'] else 'MISSED'})")
    print(f"Fisher analysis / forward:       {summary['ratio_fisher']:.2f}x (target <= {t['fisher']:.1f}x: "
          f"{'met' if summary['meets_fisher'] else 'MISSED'})")
    print(f"Fisher backpropagating every window / forward: {summary['ratio_fisher_every_window']:.2f}x")
    print(f"the default (Fisher, menu, equalized) / forward: {summary['ratio_default']:.2f}x "
          f"(the equalization stage: {summary['equalize_extra']:+.1%} over the menu analysis without it)")
    print(f"second menu entry: output +{100 * summary['menu_extra_output']:.1f} %, Fisher "
          f"+{100 * summary['menu_extra_fisher']:.1f} % (target <= +{100 * t['per_extra_format']:.0f} %: "
          f"{'met' if summary['meets_per_extra_format'] else 'MISSED'})")


if __name__ == "__main__":
    sys.exit(main())
