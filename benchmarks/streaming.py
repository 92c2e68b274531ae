"""Does streaming analysis (``--max-memory``) keep memory flat as the model grows, and time linear in layers?

A random-init Llama-architecture model (bf16, hidden 1024, MLP 2816, 16 heads / 4 KV heads,
vocabulary 8192, untied lm_head) is saved to disk at three depths (default 16, 32 and 64
layers: 0.43, 0.79 and 1.51 GB of weights). Each is analyzed by
``analysis.streaming.analyze_streaming`` in a fresh child process under one ``--max-memory``
cap (default 360MB, so the largest model is 4.1x the cap), one torch thread. The child reports
its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), its RSS after the imports and one
bitsandbytes call (the Python + torch + transformers + bitsandbytes baseline, which the cap
does not cover; peak minus baseline is what the cap is compared with), wall and CPU time
and the time of each decoder block (timestamps of the per-block checkpoint commits, taken by
wrapping ``StreamCheckpoint.commit`` at run time; the library is not modified).

Target (issue #6): peak RSS <= 1.5 x largest block + activations + 1 GB, where
"activations" is what a block's input and output for all calibration tokens take (a
streaming loop that carries them in memory holds that much; quantplan keeps them on disk
and holds one batch). Reported: whether peak RSS is flat across depths and time per layer
constant (time linear in layers). Results: ``benchmarks/results/streaming.json``.

    python benchmarks/streaming.py [--layers 16,32,64] [--max-memory 360MB] [--samples 8] [--seq-len 128]
        [--shape tiny] [--out results.json]
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

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
         "vocab_size": 8192}
#: ``--shape``: the benchmark's layer shape, or a tiny one (hidden 64) for a smoke run in seconds
SHAPES = {"benchmark": SHAPE, "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "vocab_size": 256}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="16,32,64", help="decoder depths to build (comma list)")
    parser.add_argument("--max-memory", default="360MB")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic models (default: a temp dir)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="benchmark",
                        help="decoder layer shape (tiny: a smoke run in seconds, not a measurement)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shape = json.dumps(SHAPES[args.shape])
    runs = []
    with tempfile.TemporaryDirectory(prefix="quantplan-bench-", dir=args.work) as work:
        for layers in [int(n) for n in args.layers.split(",")]:
            folder = Path(work) / f"llama-{layers}"
            built = run_child(__file__, ["build", str(folder), str(layers), shape])
            run = built | run_child(__file__, ["analyze", str(folder), args.max_memory, str(args.samples), str(args.seq_len),
                          str(args.batch_size), shape])
            run["layers"] = layers
            runs.append(run)
            print(json.dumps(run))
    result = {"machine": machine_info(threads=1), "shape": SHAPES[args.shape], "max_memory": args.max_memory,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
              "runs": runs, "summary": _summary(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _print_table(result)
    return 0



def child_build(folder: str, layers: str, shape: str = json.dumps(SHAPE)) -> dict:
    """Save a random-init Llama of ``shape`` (JSON config keys) with ``layers`` decoder layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=int(layers), max_position_embeddings=512, tie_word_embeddings=False,
                         **json.loads(shape))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def child_analyze(folder: str, max_memory: str, samples: str, seq_len: str, batch_size: str,
                  shape: str = json.dumps(SHAPE)) -> dict:
    """Analyze ``folder`` by streaming; report time, per-block times and memory."""
    import torch

    from quantplan.analysis import NF4
    from quantplan.analysis.calibration import CalibrationSet
    from quantplan.analysis.stream_store import StreamCheckpoint
    from quantplan.analysis.stream_weights import skeleton, stage_bytes
    from quantplan.analysis.streaming import analyze_streaming

    torch.set_num_threads(1)
    shape = json.loads(shape)
    ids = torch.randint(3, shape["vocab_size"], (int(samples), int(seq_len)), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(ids, "random-0", 0)
    model = skeleton(folder, torch.bfloat16)
    block = stage_bytes(model, [n for n, _ in model.model.layers[0].named_parameters(prefix="model.layers.0")])
    head = stage_bytes(model, ["lm_head.weight", "model.norm.weight"])
    del model
    NF4.roundtrip(torch.randn(64, 64, dtype=torch.bfloat16))  # load bitsandbytes' CPU library before the baseline
    import pandas  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    rss_after_imports = rss_now()
    stamps = []
    commit = StreamCheckpoint.commit

    def timed_commit(self, stage, *rest):
        commit(self, stage, *rest)
        stamps.append((stage, time.perf_counter()))

    StreamCheckpoint.commit = timed_commit
    start, cpu = time.perf_counter(), time.process_time()
    table = analyze_streaming(folder, calibration, [NF4], max_memory=max_memory, batch_size=int(batch_size),
                              progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    times = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:], strict=False)][:-1]  # decoder blocks only
    return {"wall_s": wall, "cpu_s": cpu, "block_s_mean": sum(times) / len(times), "block_s_min": min(times),
            "block_s_max": max(times), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_imports_bytes": rss_after_imports, "block_bytes": block, "lm_head_stage_bytes": head,
            "activation_bytes": 2 * ids.numel() * shape["hidden_size"] * 2, "rows": len(table.df),
            "loadavg_1min_after": os.getloadavg()[0]}



def _summary(runs: list[dict]) -> dict:
    peaks = [r["peak_rss_bytes"] for r in runs]
    above = [r["peak_rss_bytes"] - r["rss_after_imports_bytes"] for r in runs]
    largest = max(max(r["block_bytes"], r["lm_head_stage_bytes"]) for r in runs)
    target = 1.5 * largest + max(r["activation_bytes"] for r in runs) + 1e9
    per_block = [r["block_s_mean"] for r in runs]
    slope, intercept = _line([r["layers"] for r in runs], [r["cpu_s"] for r in runs])
    residual = max(abs(r["cpu_s"] - (slope * r["layers"] + intercept)) / r["cpu_s"] for r in runs)
    return {"target_peak_bytes": target, "peak_rss_max_bytes": max(peaks), "target_met": max(peaks) <= target,
            "peak_above_baseline_max_bytes": max(above),
            "peak_rss_spread": (max(peaks) - min(peaks)) / min(peaks),
            "block_wall_time_spread": (max(per_block) - min(per_block)) / min(per_block),
            "cpu_s_per_layer": slope, "cpu_s_fixed": intercept, "cpu_linear_fit_max_rel_residual": residual}


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept: CPU time = slope x layers + fixed cost."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx


def _print_table(result: dict) -> None:
    print(f"\nmax-memory {result['max_memory']}; target peak {result['summary']['target_peak_bytes'] / 1e9:.3f} GB")
    print("| layers | weights GB | peak RSS GB | RSS after imports GB | peak - imports GB | wall s | CPU s | s / block |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["runs"]:
        print(f"| {r['layers']} | {r['weight_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.3f} | "
              f"{r['rss_after_imports_bytes'] / 1e9:.3f} | "
              f"{(r['peak_rss_bytes'] - r['rss_after_imports_bytes']) / 1e9:.3f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['block_s_mean']:.2f} |")
    print(json.dumps(result["summary"], indent=1))
    print("(wall-clock seconds per block are noisy on a shared machine; quote CPU time)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        out = child_build(*rest) if kind == "build" else child_analyze(*rest)
        print(json.dumps(out))
        sys.exit(0)
    sys.exit(main())
