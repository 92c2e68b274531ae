"""Streamed Fisher analysis (``--max-memory``) vs the in-memory Fisher analysis: time, peak memory, same table?

The offline default model (SmolLM2-135M-Instruct, bf16, CPU, one torch thread) is analyzed
twice with Fisher scores on the same calibration set (default: the shipped English text, 32 x
256 tokens, batches of 4), each in a fresh child process: ``analysis.analyze(load_model(...),
fisher=True)`` in memory, and ``analysis.streaming.analyze_streaming(fisher=True,
max_memory=...)`` block by block (default cap 150MB). Each child reports wall and CPU time of
the analysis, its peak RSS (``ru_maxrss``) and its RSS after the imports (the Python + torch +
transformers + bitsandbytes baseline the cap does not cover), and saves its table; the parent
compares the two tables column by column.

Target (issue #13): streamed time <= 1.6 x the in-memory time. Results:
``benchmarks/results/streaming_fisher.json``.

    python benchmarks/streaming_fisher.py [--model PATH] [--max-memory 150MB] [--samples 32] [--seq-len 256]
        [--batch-size 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, rss_now, run_child  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "streaming_fisher.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the offline SmolLM2)")
    parser.add_argument("--max-memory", default="150MB")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    common = [args.model or "", str(args.samples), str(args.seq_len), str(args.batch_size)]
    with tempfile.TemporaryDirectory(prefix="quantplan-bench-") as work:
        memory = run_child(__file__, ["memory", str(Path(work) / "memory"), *common, ""])
        streamed = run_child(__file__, ["stream", str(Path(work) / "stream"), *common, args.max_memory])
        agreement = _compare(Path(work) / "memory", Path(work) / "stream")
    result = {"machine": machine_info(threads=1), "model": memory["model_id"], "max_memory": args.max_memory,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
              "in_memory": memory, "streamed": streamed, "tables": agreement,
              "summary": {"time_ratio_wall": streamed["wall_s"] / memory["wall_s"],
                          "time_ratio_cpu": streamed["cpu_s"] / memory["cpu_s"],
                          "target_ratio": 1.6, "target_met": streamed["cpu_s"] / memory["cpu_s"] <= 1.6}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _print(result)
    return 0



def child(kind: str, out: str, model: str, samples: str, seq_len: str, batch_size: str, max_memory: str) -> dict:
    """Analyze with Fisher scores in memory (``kind="memory"``) or streamed; report time and memory."""
    import torch

    from quantplan.analysis import NF4, analyze, load_model, resolve_source
    from quantplan.analysis.config import AnalyzeConfig, calibration_of
    from quantplan.analysis.streaming import analyze_streaming

    torch.set_num_threads(1)
    source = resolve_source(model or None)
    calibration = calibration_of(source, AnalyzeConfig(samples=int(samples), seq_len=int(seq_len)))
    NF4.roundtrip(torch.randn(64, 64, dtype=torch.bfloat16))  # load bitsandbytes' CPU library before the baseline
    from transformers.models.llama import modeling_llama  # noqa: F401

    rss_after_imports = rss_now()
    options = {"model_id": source.model_id, "model_fingerprint": source.fingerprint, "batch_size": int(batch_size),
               "out_dir": out, "progress": False, "fisher": True}
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "memory":
        table = analyze(load_model(source), calibration, [NF4], **options)
    else:
        table = analyze_streaming(source.path, calibration, [NF4], max_memory=max_memory, **options)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"model_id": source.model_id, "wall_s": wall, "cpu_s": cpu,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_imports_bytes": rss_after_imports, "rows": len(table.df),
            "fisher_samples": table.meta.get("fisher_samples"),  # the windows backpropagated (analyze()'s default)
            "calibration_tokens": int(calibration.input_ids.numel()), "loadavg_1min_after": os.getloadavg()[0]}


def _compare(memory: Path, streamed: Path) -> dict:
    """Largest relative difference per float column, and whether every other column is equal."""
    import numpy as np

    from quantplan.analysis import SensitivityTable

    a, b = SensitivityTable.load(memory).df, SensitivityTable.load(streamed).df
    differences = {}
    for column in a.columns:
        if a[column].dtype.kind == "f":
            scale = np.maximum(np.abs(a[column].to_numpy()), 1e-30)
            gap = np.abs(a[column].to_numpy() - b[column].to_numpy()) / scale
            differences[column] = float(np.nanmax(gap)) if np.isfinite(gap).any() else 0.0
    others = [c for c in a.columns if a[c].dtype.kind != "f"]
    return {"max_rel_difference": differences, "other_columns_equal": bool(a[others].equals(b[others]))}



def _print(result: dict) -> None:
    print(f"\n{result['model']}, Fisher, cap {result['max_memory']}")
    print("| analysis | wall s | CPU s | peak RSS GB | RSS after imports GB | peak - imports GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("in_memory", "streamed"):
        r = result[name]
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.3f} | "
              f"{r['rss_after_imports_bytes'] / 1e9:.3f} | "
              f"{(r['peak_rss_bytes'] - r['rss_after_imports_bytes']) / 1e9:.3f} |")
    print(json.dumps(result["summary"], indent=1))
    print(json.dumps(result["tables"], indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:])))
        sys.exit(0)
    sys.exit(main())
