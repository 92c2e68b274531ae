"""Does the whole default job under ``--max-memory`` stay within the cap, whatever the depth?

A random-init Llama (bf16, hidden 512, MLP 1536, 8 heads / 4 KV heads, SmolLM2's 49 152-word
vocabulary and tokenizer, tied embeddings) is saved at two depths (default 16 and 64 layers).
Each gets one whole ``quantplan run --max-memory CAP --budget +10%`` in a fresh process: the
streamed Fisher analysis, the plan, the streamed never-worse verification, the export
(transformers quantizing while it loads) and the fidelity report measured block by block. The
run's peak RSS, the largest of its stages' peaks in its ``profile.json`` (the profile resets
the kernel's high-water mark at each stage, so ``ru_maxrss`` would only show the last stage's), is
compared with the cap plus 1 GB. Also recorded: the RSS of
a process that has only imported torch, transformers and bitsandbytes (what no cap covers).

Target (issue #13): peak RSS <= cap + 1 GB, flat in depth, with the deepest model >= 4x the cap.

    python benchmarks/streaming_run.py [--layers 16,64] [--max-memory 100MB] [--samples 8] [--seq-len 128]
        [--shape tiny] [--dtype auto] [--out benchmarks/results/streaming_run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _machine import machine_info, rss_now, run_child  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "streaming_run.json"
SHAPES = {"benchmark": {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "tie_word_embeddings": True},
          "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "tie_word_embeddings": True}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="16,64")
    parser.add_argument("--max-memory", default="100MB")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="benchmark")
    parser.add_argument("--dtype", default="auto", help="quantplan run --dtype (auto: fp32 on a CPU without native bf16)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2's tokenizer folder (default: offline)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from gpu_check import _offline_tokenizer

    tokenizer = str(args.tokenizer or _offline_tokenizer())
    runs = []
    baseline = run_child(__file__, ["imports"])
    with tempfile.TemporaryDirectory(prefix="quantplan-bench-", dir=args.work) as work:
        for layers in [int(n) for n in args.layers.split(",")]:
            folder = Path(work) / f"llama-{layers}"
            shape = {**SHAPES[args.shape], "num_hidden_layers": layers}
            built = run_child(str(Path(__file__).parent / "gpu_check.py"),
                              ["build", str(folder), json.dumps(shape), tokenizer, "cpu"])
            run = built | run_child(__file__, ["run", str(folder), str(Path(work) / f"out-{layers}"), args.max_memory,
                                               str(args.samples), str(args.seq_len), args.dtype])
            run["layers"] = layers
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "profile"}), flush=True)
    from quantplan.analysis.models import resolve_dtype

    result = {"machine": machine_info(), "shape": SHAPES[args.shape], "max_memory": args.max_memory,
              "dtype": resolve_dtype(args.dtype, "cpu"),
              "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "imports_rss_bytes": baseline["rss"],
              "runs": runs, "summary": _summary(runs, args.max_memory, baseline["rss"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _print(result)
    return 0


def child_imports() -> dict:
    """RSS of a process that imported what every run imports (torch, transformers, bitsandbytes, pandas)."""
    import bitsandbytes  # noqa: F401
    import pandas  # noqa: F401
    import torch
    from transformers.models.llama import modeling_llama  # noqa: F401

    from quantplan.analysis.formats import NF4

    NF4.roundtrip(torch.randn(64, 64, dtype=torch.bfloat16))
    return {"rss": rss_now()}


def child_run(folder: str, out: str, max_memory: str, samples: str, seq_len: str, dtype: str) -> dict:
    """One whole ``quantplan run --max-memory`` of ``folder``; its wall time, peak RSS and stage profile."""
    command = [sys.executable, "-m", "quantplan", "run", folder, "--out", out, "--max-memory", max_memory,
               "--budget", "+10%", "--samples", samples, "--seq-len", seq_len, "--heldout-samples", "4",
               "--heldout-seq-len", seq_len, "--dtype", dtype, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"quantplan run failed:\n{done.stderr[-3000:]}")
    profile = json.loads((Path(out) / "profile.json").read_text())
    stage_peaks = {s["name"]: s["peak_rss_bytes"] for s in profile["stages"] if s["depth"] == 0}
    return {"wall_s": time.perf_counter() - start, "peak_rss_bytes": max(stage_peaks.values()),
            "stage_peaks": stage_peaks,
            "stage_seconds": {s["name"]: s["seconds"] for s in profile["stages"] if s["depth"] == 0},
            "verified": "verification" in json.loads((Path(out) / "plan.json").read_text())["checks"],
            "loadavg_1min_after": os.getloadavg()[0]}


def _summary(runs: list[dict], cap: str, imports: int) -> dict:
    from quantplan.common.sizes import parse_size

    limit = parse_size(cap) + 10**9
    peaks = [r["peak_rss_bytes"] for r in runs]
    return {"cap_bytes": parse_size(cap), "limit_bytes": limit, "peaks_bytes": peaks,
            "within_cap_plus_1GB": all(p <= limit for p in peaks),
            "deepest_over_cap": max(r["bytes_16bit"] for r in runs) / parse_size(cap),
            "peak_growth_bytes": peaks[-1] - peaks[0], "imports_rss_bytes": imports}


def _print(result: dict) -> None:
    print(f"\ncap {result['max_memory']}; imports alone {result['imports_rss_bytes'] / 1e9:.2f} GB RSS")
    print("| layers | 16-bit GB | × cap | wall s | peak RSS GB | analysis | verification | export | report |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cap = result["summary"]["cap_bytes"]
    for r in result["runs"]:
        peaks = r["stage_peaks"]
        verification = peaks.get("plan + verification", peaks.get("plan", 0))
        print(f"| {r['layers']} | {r['bytes_16bit'] / 1e9:.2f} | {r['bytes_16bit'] / cap:.1f} | {r['wall_s']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} | {peaks.get('analysis', 0) / 1e9:.2f} | {verification / 1e9:.2f} | "
              f"{peaks.get('export', 0) / 1e9:.2f} | {peaks.get('compare + report', 0) / 1e9:.2f} |")
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(globals()[f"child_{sys.argv[2]}"](*sys.argv[3:])))
    else:
        sys.exit(main())
