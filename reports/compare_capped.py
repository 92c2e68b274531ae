"""The fidelity scoreboard of a model larger than memory (``quantplan run --max-memory``).

:func:`~reports.compare.compare` loads the 16-bit model whole; under a memory cap this runs
instead. The 16-bit model, all-4-bit, each dynamic plan and the heuristic baselines at its bytes
are measured on the held-out windows block by block from disk, every variant's weights swapped
for bitsandbytes' round trip (:func:`reports.fidelity.measure_variants_streamed`, the numbers
:func:`~reports.fidelity.measure_variants` gives in memory). All-4-bit and the plans are
therefore *simulated* rows here.

The plan's exported checkpoint (``OUT/checkpoint``, given as ``checkpoint``) is measured beside
them, block by block as well: each block's tensors are read from the checkpoint's safetensors
files and each 4-bit Linear is bitsandbytes' own ``Linear4bit`` built from the packed bytes and
quant state shipped (:mod:`analysis.stream_checkpoint`), so that row is a real bitsandbytes
measurement of the artifact, next to the simulated plan row, with the footprint the checkpoint
loads at. A vision-language model's checkpoint is not measured so (the row is left out, and the
metadata's ``skipped`` says why).

What needs the whole model in memory is left out, and the comparison's metadata (``skipped``) and
the report say so: the real all-INT8 and all-4-bit loads (transformers' loader puts a quantized
model on one device, and the 16-bit logits they are compared with would need the 16-bit model
beside them), the greedy generations and the single-module predicted-vs-measured checks.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from quantplan.analysis.models import dtype_from_name
from quantplan.analysis.stream_checkpoint import CheckpointWeights, ExportedCheckpoint
from quantplan.analysis.stream_stages import layout_of
from quantplan.analysis.stream_variants import StreamOptions
from quantplan.analysis.stream_weights import skeleton
from quantplan.common.profile import stage
from quantplan.planner.baselines import KeepSet, sixteen_bit
from quantplan.planner.plan_types import KEEP, Plan

from .agreement import AGREEMENT_COLUMNS
from .compare import CompareConfig, _ordered, _row, keep_sets
from .fidelity import measure_variants_streamed
from .result import Comparison
from .scoreboard import scoreboard_frame

#: what the scoreboard leaves out under --max-memory, as the report says it
CAPPED_SKIPS = {
    "bitsandbytes": "real bitsandbytes loads of all-INT8 and all-4-bit skipped under --max-memory: transformers loads "
                    "them whole beside the 16-bit model; all-4-bit and the plans are simulated rows (bitsandbytes' "
                    "round trip, block by block)",
    "generations": "skipped under --max-memory (generating runs the whole model)",
    "agreement": "skipped under --max-memory (the single-module checks run the whole model once per module)",
}
#: how the exported checkpoint's row is measured (its ``measured_with``)
EXPORTED_WITH = "bitsandbytes (exported checkpoint, block by block)"
#: what the report says is measured for real under --max-memory
EXPORTED_MEASURED = ("the plan's exported checkpoint is measured block by block: its own packed weights and quant "
                     "states through bitsandbytes' Linear4bit, each block read from its safetensors files")
#: the scoreboard's key of the exported checkpoint's variant
_EXPORTED = "exported checkpoint"


def compare_capped(source, table, plans, fmt, heldout, meta: dict, options: CompareConfig,
                   checkpoint: str | Path | None = None) -> Comparison:
    """Every simulated row of the scoreboard, and the exported ``checkpoint`` of ``plans[0]`` (None: none), measured
    block by block under ``options.max_memory``."""
    say = print if options.progress else (lambda *a, **k: None)
    uniform, dynamic, heuristics = keep_sets(table, plans, fmt, options)
    simulated = [uniform, *dynamic]
    skipped = dict(CAPPED_SKIPS)
    exported, why = _exported(source, checkpoint, plans[0], options)
    if why:
        skipped["exported"] = why
    variants = {"16-bit": None, **{i: {n: k.formats.get(n) for n in k.quantized}
                                   for i, k in enumerate(simulated + heuristics)}}
    if exported is not None:
        variants[_EXPORTED] = ExportedCheckpoint(Path(checkpoint))
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
    if exported is not None:
        rows[2]["note"] = "simulated (bitsandbytes round trip); the exported checkpoint is measured in the next row"
        rows.append(_exported_row(dynamic[0], measured[_EXPORTED], exported, rows[2]["mean_kld"], checkpoint))
    say(f"  16-bit: perplexity {rows[0]['ppl']:.3f}; "
        + "; ".join(f"{r['variant']}: mean KLD {r['mean_kld']:.6f}" for r in rows[1:]))
    for line in skipped.values():
        say(f"quantplan compare: {line}")
    meta = {**meta, "max_memory": options.max_memory, "skipped": skipped,
            "simulation_check": {"variant": uniform.label, "simulated_mean_kld": rows[1]["mean_kld"]},
            "agreement": {"skipped": CAPPED_SKIPS["agreement"]}}
    if exported is not None:
        meta["measured"] = {"exported": EXPORTED_MEASURED, "checkpoint": str(checkpoint)}
    return Comparison(scoreboard_frame(_ordered(rows)), {}, pd.DataFrame(columns=list(AGREEMENT_COLUMNS)), meta)


def _exported_row(keep: KeepSet, fidelity, footprint: int, simulated_kld: float, checkpoint) -> dict:
    """The exported checkpoint's row: the plan's keep set, measured with bitsandbytes block by block."""
    row = _row(keep, fidelity, EXPORTED_WITH, footprint)
    row["variant"] = f"{keep.label} (exported checkpoint)"
    row["simulated_mean_kld"] = simulated_kld  # the verdict compares the plan with the heuristics on this
    row["note"] = f"the exported checkpoint {checkpoint}, run block by block through bitsandbytes' Linear4bit"
    return row


def _exported(source, checkpoint, plan: Plan, options: CompareConfig) -> tuple[int | None, str | None]:
    """(the checkpoint's footprint, None) when ``checkpoint`` can be measured block by block, else (None, why not);
    a checkpoint that does not hold ``plan``'s 4-bit modules at its blocksizes is refused."""
    if checkpoint is None:
        return None, ("the plans' real bitsandbytes loads are skipped too: no exported checkpoint to read (quantplan "
                      "run measures its own; quantplan compare --checkpoint DIR measures a saved one)")
    model = skeleton(source.path, dtype_from_name(options.dtype))
    if layout_of(model).vision is not None:
        return None, ("the exported checkpoint of a vision-language model is not measured under --max-memory "
                      "(decoder LLMs only): its row is left out")
    if all(tier == KEEP for tier in plan.choices.values()):
        return None, ("the plan keeps every module 16-bit, so its exported checkpoint is a plain 16-bit one (no "
                      "bitsandbytes module to measure): its row is left out")
    weights = CheckpointWeights(checkpoint, model)
    check_checkpoint_follows(weights.formats(), plan, checkpoint)
    return weights.footprint(model), None


def check_checkpoint_follows(formats: dict[str, tuple[str, int]], plan: Plan, checkpoint) -> None:
    """Refuse, naming the fix, a checkpoint whose 4-bit modules (name -> (quant type, blocksize)) are not ``plan``'s."""
    wrong = []
    for name, tier in plan.choices.items():
        if tier == KEEP:
            if name in formats:
                wrong.append(f"{name} is 4-bit in the checkpoint, 16-bit in the plan")
            continue
        planned = plan.format_of(tier)
        want = (planned.get("quant_type", planned.get("name")), planned.get("blocksize"))
        if formats.get(name) != want:
            wrong.append(f"{name} is {formats.get(name, '16-bit')} in the checkpoint, {tier} {want} in the plan")
    if wrong:
        raise ValueError(f"the checkpoint {checkpoint} was not exported from this plan ({len(wrong)} module(s) differ, "
                         f"e.g. {wrong[0]}): export the plan again (quantplan export) or pass its own checkpoint")
