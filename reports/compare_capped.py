"""The fidelity scoreboard of a model larger than memory (``quantplan run --max-memory``).

:func:`~reports.compare.compare` loads the 16-bit model whole; under a memory cap this runs
instead. The 16-bit model, all-4-bit, each dynamic plan and the heuristic baselines at its bytes
are measured on the held-out windows block by block from disk, every variant's weights swapped
for bitsandbytes' round trip (:func:`reports.fidelity.measure_variants_streamed`, the numbers
:func:`~reports.fidelity.measure_variants` gives in memory). All-4-bit and the plans are
therefore *simulated* rows here. What needs the whole model in memory is left out, and the
comparison's metadata (``skipped``) and the report say so: the real bitsandbytes loads (all-INT8,
all-4-bit, the plans; transformers' loader puts a quantized model on one device, and the 16-bit
logits they are compared with would need the 16-bit model beside them), the greedy generations
and the single-module predicted-vs-measured checks.
"""

from __future__ import annotations

import pandas as pd

from quantplan.analysis.models import dtype_from_name
from quantplan.analysis.stream_variants import StreamOptions
from quantplan.common.profile import stage
from quantplan.planner.baselines import sixteen_bit

from .agreement import AGREEMENT_COLUMNS
from .compare import CompareConfig, _ordered, _row, keep_sets
from .fidelity import measure_variants_streamed
from .result import Comparison
from .scoreboard import scoreboard_frame

#: what the scoreboard leaves out under --max-memory, as the report says it
CAPPED_SKIPS = {
    "bitsandbytes": "real bitsandbytes loads (all-INT8, all-4-bit, the plans) skipped under --max-memory: they load "
                    "the whole model beside the 16-bit one; all-4-bit and the plans are simulated rows (bitsandbytes' "
                    "round trip, block by block)",
    "generations": "skipped under --max-memory (generating runs the whole model)",
    "agreement": "skipped under --max-memory (the single-module checks run the whole model once per module)",
}


def compare_capped(source, table, plans, fmt, heldout, meta: dict, options: CompareConfig) -> Comparison:
    """Every simulated row of the scoreboard, measured block by block under ``options.max_memory``."""
    say = print if options.progress else (lambda *a, **k: None)
    uniform, dynamic, heuristics = keep_sets(table, plans, fmt, options)
    simulated = [uniform, *dynamic]
    variants = {"16-bit": None, **{i: {n: k.formats.get(n) for n in k.quantized}
                                   for i, k in enumerate(simulated + heuristics)}}
    stream = StreamOptions(dtype=dtype_from_name(options.dtype), batch_size=options.batch_size, device=options.device,
                           max_memory=options.max_memory, progress=options.progress)
    with stage("simulated variants (streamed)"):
        measured = measure_variants_streamed(source.path, heldout.input_ids, variants, fmt, stream)
    rows = [_row(sixteen_bit(table, fmt.name), measured["16-bit"], "16-bit")]
    rows[0]["note"] = "footprint predicted: under --max-memory the 16-bit model is read block by block, never loaded"
    for i, keep in enumerate(simulated + heuristics):
        rows.append(_row(keep, measured[i], "simulated"))
    for row in rows[1:len(simulated) + 1]:
        row["note"] = "simulated (bitsandbytes round trip): its real bitsandbytes load is skipped under --max-memory"
    say(f"  16-bit: perplexity {rows[0]['ppl']:.3f}; "
        + "; ".join(f"{r['variant']}: mean KLD {r['mean_kld']:.6f}" for r in rows[1:]))
    for line in CAPPED_SKIPS.values():
        say(f"quantplan compare: {line}")
    meta = {**meta, "max_memory": options.max_memory, "skipped": dict(CAPPED_SKIPS),
            "simulation_check": {"variant": uniform.label, "simulated_mean_kld": rows[1]["mean_kld"]},
            "agreement": {"skipped": CAPPED_SKIPS["agreement"]}}
    return Comparison(scoreboard_frame(_ordered(rows)), {}, pd.DataFrame(columns=list(AGREEMENT_COLUMNS)), meta)
