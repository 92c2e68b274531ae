"""compare(): measure 16-bit, all-INT8, all-4-bit, each dynamic plan and its heuristic baselines on held-out text.

The loop, in the order it runs:

1. load the 16-bit model and its greedy generations;
2. in that same model, simulate (bitsandbytes round trip, :mod:`analysis.simulate`) the
   all-4-bit model (a check on the simulation) and each plan (so that plans and heuristics
   are judged like for like), each heuristic baseline at each plan's bytes, and each of the
   top-K + random-K modules alone (predicted vs measured): batch by batch, each held-out
   batch's 16-bit logits computed once and every variant compared with them before the next
   (:func:`~reports.fidelity.measure_variants`), so the logits of one batch are alive at a time;
3. load all-INT8, all-4-bit and each dynamic plan for real through transformers'
   ``BitsAndBytesConfig``, their weights read from the 16-bit model in memory, not from its files
   again (:func:`~analysis.models.load_quantized_from`), one at a time beside the 16-bit model
   whose logits are made again per batch (from the 16-bit hidden states step 2 kept, where the
   head is plain), and measure fidelity, footprint and generations. A
   variant that fails to load or run gets a row that says why.

``report=ReportDepth.QUICK`` (``--report quick``, ``run``'s default) leaves out what costs most
beyond the scoreboard: the single-module checks of step 2, the random baseline's seeds after the
first, the generations, and step 3's real loads of all-INT8 (a reference at 8 bits a weight, not a
competitor of the plans at their bytes) and of all-4-bit (its row is step 2's simulation, which tests/test_reports.py
checks against the real load); the report says so. Step 3 then loads only the plans a
``BitsAndBytesConfig`` expresses (a blocksize-menu plan is simulated: its exported checkpoint loads it).

With ``max_memory`` (``quantplan run --max-memory``) the 16-bit model is never loaded whole: the
simulated variants of step 2 run block by block from disk (:mod:`reports.compare_capped`), the
plan's exported checkpoint (``checkpoint``) runs beside them block by block through bitsandbytes'
own 4-bit Linears, and what needs the whole model (steps 1's generations and 3's all-INT8 and
all-4-bit loads, the single-module checks) is skipped with a line saying so.

The held-out text must not be the calibration text the plan was measured on.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import pandas as pd
import torch

from quantplan.analysis import load_calibration, load_model, load_processor, resolve_source
from quantplan.analysis.equalize import apply_equalization, equalization_of
from quantplan.analysis.formats import FourBit, format_from_dict
from quantplan.analysis.memory import footprint_16bit
from quantplan.analysis.models import ModelSource, dtype_from_name, load_quantized_from, resolve_dtype
from quantplan.analysis.simulate import QuantCache
from quantplan.analysis.table import SensitivityTable, TableMismatch
from quantplan.common.heap import release_freed_memory
from quantplan.common.profile import stage
from quantplan.planner.baselines import (
    KeepSet,
    all_4bit,
    all_int8,
    baseline_keep_sets,
    plan_keep_set,
    sixteen_bit,
)
from quantplan.planner.export import bnb_config
from quantplan.planner.plan_types import Plan
from quantplan.planner.skiplist import build_skip_list

from .agreement import AGREEMENT_COLUMNS, predicted_vs_measured
from .fidelity import Fidelity, heldout_reference, measure, measure_variants
from .generations import PROMPTS, generate
from .result import Comparison
from .scoreboard import scoreboard_frame
from .source_baseline import NOTE as SOURCE_NOTE
from .source_baseline import equalized_label, source_all_4bit


class ReportDepth(Enum):
    """How much the report measures: ``full`` everything; ``quick`` the scoreboard without the costly extras."""

    QUICK = "quick"
    FULL = "full"


#: what ``--report quick`` leaves out, as the report says it
QUICK_SKIPS = {
    "agreement": "skipped by --report quick (the single-module predicted-vs-measured checks cost one "
                 "forward per module): run with --report full to measure them",
    "seeds": "--report quick measures the random baseline with one seed (--report full: all seeds)",
    "generations": "skipped by --report quick (greedy generations of every variant): run with --report full",
    "simulation check": "simulated (bitsandbytes round trip), as is the all-4-bit row recovery is counted from: "
                        "--report quick skips its real bitsandbytes load, the check that the simulation matches it "
                        "(--report full measures both)",
    "int8": "a real bitsandbytes 8-bit load of the whole model beside the 16-bit one, and a forward pass of it, for "
            "a reference at 8 bits a weight (on SmolLM2 about 1.5x all-4-bit's bytes), not a competitor of the plans "
            "at their bytes",
}


@dataclass(frozen=True)
class CompareConfig:
    """What to measure and on how much held-out text (defaults sized for SmolLM2 on a 2-core CPU)."""

    heldout: str = "heldout"  # the shipped held-out text, or any calibration source (file, hub dataset)
    samples: int = 8
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 4
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 32
    top_k: int = 8  # predicted vs measured: the most sensitive modules by the plan's score ...
    random_k: int = 8  # ... plus this many others at random
    agreement_samples: int = 2  # held-out windows for each single-module measurement
    seeds: tuple[int, ...] = (0, 1, 2)  # random baseline
    baselines: bool = True
    device: str = "cpu"
    dtype: str = "auto"  # the 16-bit model's and the simulated variants' dtype; auto: per device, as the analysis
    progress: bool = True
    report: ReportDepth = ReportDepth.FULL
    max_memory: str | None = None  # stream the simulated variants block by block under this cap (reports.compare_capped)

    def __post_init__(self):
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))  # "auto" -> bf16 / fp32
        if not isinstance(self.report, ReportDepth):  # "quick" / "full" from a caller or a saved config
            object.__setattr__(self, "report", ReportDepth(self.report))

    @property
    def seed_values(self) -> tuple[int, ...]:
        """The random baseline's seeds: all of ``seeds`` for a full report, the first for a quick one."""
        return self.seeds[:1] if self.report is ReportDepth.QUICK else self.seeds


def compare(model: str | ModelSource | None, plans, out_dir: str | Path | None = None, *,
            table: SensitivityTable | str | Path | None = None, options: CompareConfig | None = None,
            model16=None, checkpoint: str | Path | None = None, packed=None) -> Comparison:
    """Measure every variant; with ``out_dir`` write scoreboard.csv/.md, generations, agreement there.
    ``model16``: the 16-bit model already loaded as ``options`` says (borrowed: left as it was found), ``packed``
    its packed 4-bit weights made before (:class:`~analysis.packed.PackedWeights`, reused by the simulations and
    emptied after them, before a bitsandbytes model loads beside the 16-bit one: the scoreboard is a run's last step);
    ``checkpoint``: the first plan's exported checkpoint, measured block by block under ``options.max_memory``."""
    options = options or CompareConfig()
    if checkpoint is not None and not options.max_memory:
        raise ValueError("an exported checkpoint is measured block by block under --max-memory: pass --max-memory "
                         "SIZE, or leave --checkpoint out (in memory, the plans load through bitsandbytes themselves)")
    source = model if isinstance(model, ModelSource) else resolve_source(model)
    if not plans:
        raise ValueError("compare needs at least one plan: pass --plan plan.json")
    if table is None:  # plan.json is written beside its sensitivity table by `plan` and `run`
        table = next((_folder(p) for p in plans if not isinstance(p, Plan)), None)
    plans = [p if isinstance(p, Plan) else Plan.load(p) for p in plans]
    table = _table_for(table, plans)
    for p in plans:
        p.check_model(source.fingerprint)
    fmt = format_from_dict(plans[0].quant) if plans[0].quant else FourBit(plans[0].tiers[0])
    dtype = dtype_from_name(options.dtype)
    processor = load_processor(source)
    heldout = _heldout(source, processor, table, options)
    say = print if options.progress else (lambda *a, **k: None)
    say(f"quantplan compare: {heldout.tokens} held-out tokens ({heldout.meta['samples']} x "
        f"{heldout.meta['seq_len']}), {len(plans)} plan(s)")
    meta = {"model_id": source.model_id, "model_fingerprint": source.fingerprint, "heldout": heldout.meta,
            "calibration": table.meta.get("calibration", {}), "format": fmt.name,
            "plans": [asdict(p.budget) for p in plans], "options": {**vars(options), "report": options.report.value},
            "report": options.report.value}

    if options.max_memory and equalization_of(table.meta):
        raise ValueError("this table was measured on channel-scaled weights (quantplan's equalization), which the "
                         "--max-memory scoreboard does not stream yet: compare without --max-memory, or analyze with "
                         "--no-equalize")
    if options.max_memory:
        from .compare_capped import compare_capped

        comparison = compare_capped(source, table, plans, fmt, heldout, meta, options, checkpoint)
        if out_dir is not None:
            comparison.save(out_dir)
        return comparison
    # 1. the 16-bit model, 2. everything simulated in it, batch by batch against its logits
    equalization = equalization_of(table.meta)
    if model16 is None:
        packed = None  # packed weights belong to the model they were made from
        with stage("load model"):
            model16 = load_model(source, dtype=dtype, device=options.device)
            apply_equalization(model16, equalization)  # the weights the plans were measured on
    reference = heldout_reference(model16, heldout.input_ids, options.batch_size, options.progress)
    footprint16 = footprint_16bit(model16)
    generations = {"16-bit": _generate(model16, processor, options)}
    cache = QuantCache(model16, fmt, packed)
    uniform, dynamic, heuristics = keep_sets(table, plans, fmt, options)
    uniform = equalized_label(uniform, equalization)
    # like-for-like with the heuristic rows; a blocksize-menu plan has no BitsAndBytesConfig, so its row is simulated
    simulated = [uniform, *dynamic] if options.baselines else [uniform, *(k for k in dynamic if k.mixed_formats)]
    with stage("simulated variants"):
        measured = measure_variants(reference, cache, {"16-bit": None, **{
            i: {n: k.formats.get(n) for n in k.quantized} for i, k in enumerate(simulated + heuristics)}})
    rows = [_row(sixteen_bit(table, fmt.name), measured["16-bit"], "16-bit", footprint16)]
    say(f"  16-bit: perplexity {rows[0]['ppl']:.3f}")
    simulated_kld = {k.label: float(measured[i].kld.mean()) for i, k in enumerate(simulated)}
    for i, keep in enumerate(simulated):
        if keep.mixed_formats:
            rows.append(_row(keep, measured[i], "simulated"))
            rows[-1]["note"] = "per-module blocksizes: simulated (the exported checkpoint loads them)"
    simulated_uniform = None  # --report quick: all-4-bit's row is its simulation, added after step 3's rows
    if options.report is ReportDepth.QUICK and not uniform.mixed_formats:
        simulated_uniform = _row(uniform, measured[simulated.index(uniform)], "simulated")
        simulated_uniform["note"] = QUICK_SKIPS["simulation check"]
    meta["simulation_check"] = {"variant": uniform.label, "simulated_mean_kld": simulated_kld[uniform.label]}
    for i, keep in enumerate(heuristics, start=len(simulated)):
        rows.append(_row(keep, measured[i], "simulated"))
        say(f"  {keep.label}{'' if keep.seed is None else f' seed {keep.seed}'}: mean KLD {rows[-1]['mean_kld']:.6f}")
    agreement, meta["agreement"] = _agreement(table, plans[0], cache, model16, heldout, options)
    cache.drop_packed()  # the simulations are done: their packed 4-bit weights go before a bitsandbytes model loads
    del cache
    meta["equalized"] = any(p.equalized for p in plans)  # an all-16-bit plan's checkpoint holds the source weights
    source_row = None  # all-4-bit of the source weights, beside the scaled all-4-bit row (after step 3's rows)
    if equalization:
        with stage("all-4-bit of the source weights"):
            keep, fidelity = source_all_4bit(model16, equalization, uniform, reference, fmt)
        source_row = {**_row(keep, fidelity, "simulated"), "note": SOURCE_NOTE, "recovery_base": True}
        say(f"  {keep.label}: mean KLD {source_row['mean_kld']:.6f}")

    # 3. real bitsandbytes loads, one at a time, each against the 16-bit logits made again per batch (step 2's hidden states)
    quantized = []  # all-INT8 and the simulation check: real loads of a whole model beside the 16-bit one
    if options.report is ReportDepth.FULL:
        quantized.append((all_int8(table), _int8_config()))
        if not uniform.mixed_formats:  # the simulation check: all-4-bit's real load beside its simulated row
            quantized.append((uniform, _uniform_config(uniform, fmt, dtype)))
    else:
        say(f"  all-INT8: not measured by --report quick ({QUICK_SKIPS['int8']}): --report full measures it")
    quantized += [(keep, bnb_config(p, dtype)) for keep, p in zip(dynamic, plans, strict=True)
                  if not keep.mixed_formats]
    for keep, config in quantized:
        with stage(f"bitsandbytes {keep.label}"):
            row, generations[keep.label] = _measure_bnb(source, model16, keep, config, reference, processor, options,
                                                        scaled=bool(equalization))
        row["simulated_mean_kld"] = simulated_kld.get(keep.label, float("nan"))
        rows.append(row)
        if keep is uniform:
            meta["simulation_check"]["bitsandbytes_mean_kld"] = row.get("mean_kld", float("nan"))
        say(f"  {keep.label}: mean KLD {row.get('mean_kld', float('nan')):.6f}, "
            f"footprint {row['footprint_bytes']:,} bytes {row['note']}")
    rows += [row for row in (source_row, simulated_uniform) if row is not None]

    del model16, reference
    gc.collect()
    comparison = Comparison(scoreboard_frame(_ordered(rows)), generations, agreement, meta)
    if out_dir is not None:
        comparison.save(out_dir)
    return comparison


def keep_sets(table, plans: list[Plan], fmt: FourBit, options: CompareConfig):
    """(all-4-bit, each plan's, the heuristic baselines at each plan's bytes) as keep sets."""
    heuristics = [k for p in plans for k in baseline_keep_sets(table, p, options.seed_values)] if options.baselines else []
    return all_4bit(table, fmt.name), [plan_keep_set(table, p) for p in plans], heuristics


def _agreement(table, plan: Plan, cache: QuantCache, model16, heldout, options: CompareConfig):
    """Predicted vs measured on the first ``agreement_samples`` windows; skipped by ``--report quick``."""
    if options.report is ReportDepth.QUICK:
        return pd.DataFrame(columns=list(AGREEMENT_COLUMNS)), {"skipped": QUICK_SKIPS["agreement"]}
    with stage("predicted vs measured"):
        small = heldout_reference(model16, heldout.input_ids[: options.agreement_samples], options.batch_size)
        frame, stats = predicted_vs_measured(table, plan, cache, small, options.top_k, options.random_k, options.seed)
    if options.progress:
        print(f"  predicted vs measured: {stats['verdict']}")
    return frame, stats


def _generate(model, processor, options: CompareConfig) -> dict[str, str]:
    """Greedy generations of the fixed prompts; none under ``--report quick``."""
    if options.report is ReportDepth.QUICK:
        return {}
    return generate(model, processor, options.prompts, options.max_new_tokens)


class NotFromMemory(RuntimeError):
    """A real bitsandbytes row that only the source files could give, where they hold other weights than the plans'."""


def _measure_bnb(source, model16, keep: KeepSet, config, reference, processor, options,
                 scaled: bool = False) -> tuple[dict, dict]:
    """Load one variant through bitsandbytes, its weights read from ``model16`` in memory where the loader takes
    them back (else from ``source``'s files, unless ``model16`` holds channel-scaled weights the files do not: the
    row then says it was not measured), and measure it; a failure becomes a row that says so."""
    model = None
    dtype = dtype_from_name(options.dtype)
    try:
        with _quiet_int8_cast():
            model = None if model16 is None else load_quantized_from(model16, config, dtype, options.device)
            if model is None and scaled:
                raise NotFromMemory("this model's bitsandbytes loader reads the source files, whose weights are not "
                                    "channel-scaled as the plans' are (the simulated rows are)")
            if model is None:
                model = load_model(source, dtype=dtype, device=options.device, quantization_config=config)
            release_freed_memory()  # the load's quantization temporaries, freed between the weights it keeps
            fidelity = measure(model, reference)
            answers = _generate(model, processor, options)
        return _row(keep, fidelity, "bitsandbytes", footprint_16bit(model)), answers
    except Exception as err:  # e.g. bitsandbytes 8-bit without a CPU kernel: report it, do not crash
        note = (f"not measured: {err}" if isinstance(err, NotFromMemory) else
                f"bitsandbytes failed on {options.device}: {type(err).__name__}: {str(err)[:200]}")
        row = _row(keep, None, "bitsandbytes", keep.footprint_bytes)
        row["note"] = note
        return row, {} if options.report is ReportDepth.QUICK else {p: "(not run: variant failed)"
                                                                       for p in options.prompts}
    finally:
        del model
        gc.collect()


@contextmanager
def _quiet_int8_cast():
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every bf16 forward."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _row(keep: KeepSet, fidelity: Fidelity | None, measured_with: str, footprint: int | None = None) -> dict:
    row = {"variant": keep.label, "kind": keep.kind, "plan": keep.plan, "seed": keep.seed,
           "measured_with": "simulated (bitsandbytes round trip)" if measured_with == "simulated" else measured_with,
           "kept_16bit": len(keep.kept), "bytes": keep.bytes,
           "footprint_bytes": footprint if footprint is not None else keep.footprint_bytes, "note": ""}
    if fidelity is not None:
        row.update(fidelity.summary())
        if measured_with == "simulated":
            row["simulated_mean_kld"] = row["mean_kld"]
    return row


def _ordered(rows: list[dict]) -> list[dict]:
    rank = {"reference": 0, "uniform": 1, "dynamic": 2, "heuristic": 3}
    plans = list(dict.fromkeys(r["plan"] for r in rows if r["plan"]))
    return sorted(rows, key=lambda r: (plans.index(r["plan"]) + 1 if r["plan"] else 0, rank[r["kind"]]))


def _int8_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _uniform_config(keep: KeepSet, fmt: FourBit, dtype: torch.dtype):
    """Plain bitsandbytes 4-bit; the skip list names lm_head and modules bitsandbytes cannot hold."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt.quant_type,
                              bnb_4bit_use_double_quant=fmt.double_quant, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=build_skip_list(sorted(keep.kept), sorted(keep.quantized)))


def _table_for(table, plans: list[Plan]) -> SensitivityTable:
    if not isinstance(table, SensitivityTable):
        folder = table
        if folder is None:
            raise FileNotFoundError("compare needs the sensitivity table the plans came from: pass --table DIR")
        table = SensitivityTable.load(folder)
    stale = [p.budget.spec for p in plans if p.table_hash and p.table_hash != table.content_hash]
    if stale:
        raise TableMismatch(f"the plan(s) {stale} were made from another sensitivity table (hash differs): "
                            "pass the --table they were planned from")
    return table


def _folder(plan_path) -> Path:
    path = Path(plan_path)
    return path if path.is_dir() else path.parent


def _heldout(source, processor, table: SensitivityTable, options: CompareConfig):
    from transformers import AutoConfig

    tokenizer = getattr(processor, "tokenizer", processor)
    positions = getattr(AutoConfig.from_pretrained(source.path).get_text_config(), "max_position_embeddings", None)
    heldout = load_calibration(tokenizer, options.heldout, options.samples, options.seq_len, options.seed, positions)
    calibration = table.meta.get("calibration", {})
    if heldout.source == calibration.get("source", "default") or heldout.fingerprint == calibration.get("fingerprint"):
        raise ValueError(f"the held-out text {heldout.source!r} is the calibration text the plan was measured on: "
                         "pass a disjoint --heldout source (the default, 'heldout', is the shipped held-out file)")
    return heldout
