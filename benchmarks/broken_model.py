"""Plans on a model that 4-bit breaks badly (the stand-in of broken_standin.py) beside SmolLM2, at +10 %.

One Fisher analysis per model with ``--formats nf4,nf4-bs32`` gives every row. Rows (each
simulated with bitsandbytes' round trip, mean next-token KL vs 16-bit on the shipped held-out
text, recovery = share of the all-NF4 KL closed):

- ``default before``: the Fisher plan at blocksize 64 + the verification (``--refine 0 --tiers nf4``);
- ``default now``: the same, then the automatic refinement when its checks fire
  (:class:`planner.auto_refine.AutoRefine`; ``quantplan run``'s default);
- ``--refine N``: N rounds asked for (the default-now plan when the automatic refinement ran
  with N rounds and shipped: the same computation);
- ``menu``: the ``nf4,nf4-bs32`` blocksize menu plan + verification, and ``menu, default now``:
  what the automatic refinement makes of it (the refinement plans over the menu too, each round
  choosing 16-bit, blocksize 64 or 32 per module; the better-measured of the two ships, as in
  :mod:`quantplan.endtoend`);
- heuristics at the default plan's bytes: first+last layers, weight error, random (3 seeds).

Also recorded per model: what the automatic refinement's checks measured (all-4-bit calibration
KL, measured / predicted recovery), which is what its thresholds are chosen from.

    python benchmarks/broken_model.py --model standin|smollm2|FOLDER [--samples 32] [--heldout 16] [--threads 1]

``standin`` builds the stand-in first when its folder is missing. Merges the model's entry into
benchmarks/results/broken_model.json (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

from blocksize_menu import all_4bit_names  # noqa: E402
from broken_standin import build, default_folder  # noqa: E402
from plan_quality import _machine, _timed, add_analysis_arguments, random_mean, reused_table  # noqa: E402

from quantplan.analysis import NF4, analyze, load_calibration, load_model, load_processor, resolve_source  # noqa: E402
from quantplan.analysis.equalize import apply_equalization, equalization_of  # noqa: E402
from quantplan.analysis.formats import NF4_BS32  # noqa: E402
from quantplan.analysis.models import dtype_from_name  # noqa: E402
from quantplan.analysis.reference import KLReference  # noqa: E402
from quantplan.analysis.simulate import QuantCache  # noqa: E402
from quantplan.endtoend import EndToEnd  # noqa: E402
from quantplan.planner.auto_refine import AutoRefine, recovery_share  # noqa: E402
from quantplan.planner.baselines import all_4bit, baseline_keep_sets, plan_keep_set  # noqa: E402
from quantplan.planner.config import PlanConfig  # noqa: E402
from quantplan.reports.fidelity import heldout_reference, measure_variants  # noqa: E402

BUDGET = "+10%"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="standin", help="standin, standin-deep (broken even after the channel "
                                                             "equalization), smollm2, or a model folder")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--refine", type=int, default=4, help="rounds of the --refine row and the automatic one")
    parser.add_argument("--no-refine-row", action="store_true",
                        help="skip the --refine row where the automatic refinement did not run (saves its rounds)")
    parser.add_argument("--end-to-end-batches", type=int, default=None,
                        help="calibration batches the verification and refinement use (quantplan run's option)")
    parser.add_argument("--table", help="folder to reuse the table from (analyzed and saved there if missing)")
    parser.add_argument("--dtype", default="fp32",
                        help="dtype the model runs in (fp32: CPU bf16 matmuls are ~50x slower single-threaded)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    add_analysis_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "broken_model.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, spec = _model_spec(args.model)
    source = resolve_source(spec)
    model, tokenizer = load_model(source, dtype=dtype_from_name(args.dtype)), load_processor(source)
    calibration = load_calibration(tokenizer, None, args.samples, args.seq_len)
    heldout = load_calibration(tokenizer, "heldout", args.heldout, args.seq_len)
    reference = heldout_reference(model, heldout.input_ids)  # the same logits after the scales (bit-identical)
    source_nf4 = float(measure_variants(reference, QuantCache(model, NF4), {"v": all_4bit_names(model)})["v"].kld.mean())
    table, analysis = _table(model, calibration, source, args.table, args.equalize, args.fisher_samples)
    measure = _measurer(reference, QuantCache(model, NF4), table)
    equalized = bool(equalization_of(table.meta))
    if equalized:  # recovery from what a user gets without quantplan: plain NF4 of the source weights
        measure.all_nf4_equalized, measure.all_nf4 = measure.all_nf4, source_nf4
    batches = args.end_to_end_batches  # the batches after them choose between a refined and the first plan
    shared = {"reference": KLReference(model, calibration, 4, batches), "cache": QuantCache(model, NF4),
              "progress": False,
              "heldback": None if batches is None else KLReference(model, calibration, 4, batches, first_batch=batches)}
    auto = EndToEnd(refine=None, auto=AutoRefine(rounds=args.refine))
    rows, checks = [], {}

    def add(label, keep, seconds=None, plan=None):
        rows.append(_row(label, keep, measure(keep), measure.all_nf4, seconds, plan))
        print(f"{name}: {label:<44} kept {rows[-1]['kept']:>3}  KLD {rows[-1]['kld']:.4f}  "
              f"recovery {rows[-1]['recovery']:.0%}", flush=True)

    add("all-NF4" + (" (equalized)" if equalized else ""), all_4bit(table, "nf4"))
    nf4 = PlanConfig(tiers=("nf4",))
    before, cost = _timed(lambda: EndToEnd(refine=0).run_checks(table, BUDGET, nf4, model, calibration, **shared))
    add("default before (fisher + verify)", plan_keep_set(table, before), cost["wall_s"], before)
    checks["before"] = _checks(before, auto.auto)
    print(f"{name}: automatic refinement checks {checks['before']}", flush=True)
    now, cost = _timed(lambda: auto.refine_if_broken(table, BUDGET, nf4, before, model, calibration, shared))
    add("default now (+ automatic refinement if fired)", plan_keep_set(table, now), cost["wall_s"], now)
    record = now.checks.refinement
    if record is not None and record.shipped and record.rounds == args.refine:
        refined = now
        add(f"--refine {args.refine} (= default now)", plan_keep_set(table, refined), record.seconds, refined)
    elif args.no_refine_row:
        refined = before
    else:
        refined, cost = _timed(lambda: EndToEnd(refine=args.refine).run_checks(table, BUDGET, nf4, model,
                                                                                calibration, **shared))
        add(f"--refine {args.refine}", plan_keep_set(table, refined), cost["wall_s"], refined)
    menu, cost = _timed(lambda: EndToEnd(refine=0).run_checks(table, BUDGET, PlanConfig(), model, calibration,
                                                              **shared))
    add("menu nf4,nf4-bs32 (+ verify)", plan_keep_set(table, menu), cost["wall_s"], menu)
    checks["menu"] = _checks(menu, auto.auto)
    menu_now, cost = _timed(lambda: auto.refine_if_broken(table, BUDGET, PlanConfig(), menu, model, calibration,
                                                          shared))
    add("menu, default now (+ automatic refinement if fired)", plan_keep_set(table, menu_now), cost["wall_s"],
        menu_now)
    for keep in baseline_keep_sets(table, before):
        add(keep.label.split(" @ ")[0] + (f" (seed {keep.seed})" if keep.seed is not None else ""), keep)
    summary = {"model": name, "model_id": source.model_id, "calibration_tokens": calibration.tokens,
               "fisher_samples": table.meta.get("fisher_samples", table.meta["calibration"]["samples"]),
               "heldout_tokens": heldout.tokens, "end_to_end_tokens": shared["reference"].tokens, "budget": BUDGET,
               "all_nf4_kld": measure.all_nf4, "source_all_nf4_kld": source_nf4, "equalized": equalized,
               "analysis": analysis, "auto_refine": asdict(auto.auto), "checks": checks, "rows": rows,
               "machine": _machine()}
    _merge(Path(args.out), name, summary)
    print(markdown(summary))


#: the stand-ins by name and their damage factors. ``standin`` (16 / 32) is broken for plain NF4 (all-NF4 KLD 0.70),
#: but the channel equalization of ``quantplan run`` (analysis/equalize.py) undoes most of its damage (0.24);
#: ``standin-deep`` (1024 / 4096) stays as broken after equalization (0.70) as ``standin`` is without it
STANDINS = {"standin": (16.0, 32.0), "standin-deep": (1024.0, 4096.0)}


def _model_spec(model: str) -> tuple[str, str | None]:
    """The label and the resolve_source spec; builds the stand-in when its folder is missing."""
    if model == "smollm2":
        return "SmolLM2-135M", None
    if model in STANDINS:
        scales = STANDINS[model]
        folder = default_folder(scales=scales)
        if not (folder / "config.json").is_file():
            build(folder, scales=scales, measure_original=False)  # SmolLM2's all-NF4 KLD is its own run's row
        return f"stand-in (broken_standin.py{'' if model == 'standin' else ' --scales 1024,4096'})", str(folder)
    return Path(model).name, model


def _table(model, calibration, source, folder, equalize: bool = True, fisher_samples: int | None = None):
    """The Fisher table over nf4 and nf4-bs32 (reused from ``folder`` when saved there, ``model`` then scaled as it
    says) and its analysis cost."""
    if folder and (Path(folder) / "sensitivity.json").is_file():
        table = reused_table(folder, calibration, fisher_samples=fisher_samples)
        apply_equalization(model, equalization_of(table.meta))
        return table, None
    return _timed(lambda: analyze(model, calibration, [NF4, NF4_BS32], progress=False, fisher=True,
                                  model_fingerprint=source.fingerprint, out_dir=folder, equalize=equalize,
                                  fisher_samples=fisher_samples))


def _measurer(reference, cache, table):
    """kld(keep set) on the held-out text, with ``.all_nf4`` the all-NF4 (blocksize 64) value."""
    def kld(keep) -> float:
        variant = {n: keep.formats.get(n) for n in sorted(keep.quantized & set(cache.modules))}
        return float(measure_variants(reference, cache, {"v": variant})["v"].summary()["mean_kld"])

    kld.all_nf4 = kld(all_4bit(table, "nf4"))
    return kld


def _checks(verified, rule: AutoRefine) -> dict:
    """What the automatic refinement's checks measured on a verified plan."""
    record = verified.checks.verification
    trigger = rule.trigger(verified)
    return {"all_4bit_calibration_kld": record.calibration_kld[record.all_4bit],
            "plan_calibration_kld": record.calibration_kld["plan"],
            "predicted_recovery": 1 - verified.predicted.error / verified.predicted.error_all_4bit,
            "recovery_share": recovery_share(verified), "verification_chose": record.chosen,
            "fires": trigger.kind.value if trigger else None}


def _row(label, keep, value, all_nf4, seconds=None, plan=None) -> dict:
    row = {"score": label, "kept": len(keep.kept), "kld": value, "recovery": (all_nf4 - value) / all_nf4,
           "bytes": int(keep.bytes)}
    if seconds is not None:
        row["wall_s"] = seconds
    if plan is not None:
        row["formats"] = {f: list(plan.choices.values()).count(f) for f in set(plan.choices.values())}
        refinement = plan.checks.refinement
        if refinement is not None:
            row["refinement"] = refinement.to_dict()
    return row


def _merge(out: Path, name: str, summary: dict) -> None:
    """Write ``summary`` as ``models[name]`` of the JSON at ``out``, keeping the other models' entries (atomic)."""
    data = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    data["models"][name] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def markdown(summary: dict) -> str:
    """One model's rows as a Markdown table (random seeds averaged)."""
    all_nf4 = summary["all_nf4_kld"]
    lines = [f"{summary['model']}: all-NF4 KLD {all_nf4:.4f} on {summary['heldout_tokens']} held-out tokens; "
             f"checks {summary['checks']}", "", "| variant | kept | KLD | recovery | wall s |", "|---|---|---|---|---|"]
    randoms = [r for r in summary["rows"] if r["score"].startswith("random")]
    for r in summary["rows"]:
        if not r["score"].startswith("random"):
            seconds = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
            lines.append(f"| {r['score']} | {r['kept']} | {r['kld']:.4f} | {r['recovery']:.0%} | {seconds} |")
    if randoms:
        kept, mean, recovery = random_mean(randoms, all_nf4)
        lines.append(f"| random (mean of {len(randoms)}) | {kept} | {mean:.4f} | {recovery:.0%} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
