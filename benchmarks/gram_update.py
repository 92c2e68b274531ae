"""What does accumulating the Gram matrix on its upper blocks only save over a full ``addmm``?

The calibration pass adds ``xᵀx`` for every distinct Linear input of every batch (analysis/probe.py); a full
``G.addmm_(xᵀ, x)`` computes each off-diagonal entry twice. ``analysis.gram.UpperGram.add`` multiplies (and
stores) only the column blocks on and above the diagonal (about (k + 1) / 2k of the products for k blocks). This times both on
random float32 rows for the input widths of SmolLM2-135M (576, 1536) and Llama-3-8B (4096, 14336), one batch
of 4 x 256 tokens, and checks that the stored blocks make the full product.

    python benchmarks/gram_update.py [--tokens 1024] [--widths 576,1536,4096,14336] [--repeats 3] [--threads 1]
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

from quantplan.analysis.gram import UpperGram, block_width, upper_elements  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gram_update.json"


def best_seconds(step, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(width: int, tokens: int, repeats: int) -> dict:
    """Full product vs the stored upper blocks for one input width."""
    torch.manual_seed(width)
    rows = torch.randn(tokens, width)
    full, upper = torch.zeros(width, width), UpperGram.zeros(width)
    full_s = best_seconds(lambda: full.addmm_(rows.T, rows), repeats)
    upper_s = best_seconds(lambda: upper.add(rows), repeats)
    full_matrix_s = best_seconds(upper.full, 1)
    check_full, check_upper = torch.zeros(width, width), UpperGram.zeros(width)
    check_full.addmm_(rows.T, rows)
    check_upper.add(rows)
    error = float((check_full - check_upper.full()).abs().max() / check_full.abs().max())
    return {"width": width, "tokens": tokens, "block_width": block_width(width), "full_s": full_s,
            "upper_s": upper_s, "ratio": upper_s / full_s, "full_matrix_s": full_matrix_s, "max_rel_difference": error,
            "stored_share": upper_elements(width) / width ** 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--widths", default="576,1536,4096,14336")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(int(w), args.tokens, args.repeats) for w in args.widths.split(",")]
    result = {"benchmark": "gram_update", "machine": machine_info(args.threads), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| width | block | full addmm s | upper blocks s | ratio | full matrix once s | max rel. difference | stored |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['width']} | {r['block_width']} | {r['full_s']:.4f} | {r['upper_s']:.4f} | {r['ratio']:.2f} | "
              f"{r['full_matrix_s']:.4f} | {r['max_rel_difference']:.1e} | {r['stored_share']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
