"""The ``quantplan`` command: analyze, plan, export, and run (all three)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from quantplan.analysis.models import DEFAULT_MODEL
from quantplan.compare_cli import add_compare_args, add_compare_parser

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; user errors print one line and exit 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt as err:
        print(f"quantplan: interrupted. {err}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"quantplan: error: {err}", file=sys.stderr)
        return 2


def _analyze(args) -> int:
    from quantplan.analysis import resolve_source

    from .pipeline import analyze_model

    analyze_model(resolve_source(args.model), args.out, _analyze_options(args))
    print(f"quantplan: wrote {Path(args.out) / 'sensitivity.parquet'} and sensitivity.json")
    return 0


def _plan(args) -> int:
    from quantplan.analysis.table import SensitivityTable

    from .pipeline import plan_and_save

    out = Path(args.out or args.table)
    chosen = plan_and_save(SensitivityTable.load(args.table), args.budget, out, args.priors, **_plan_options(args))
    print(f"quantplan: wrote {out / 'plan.json'} and {out / 'pareto.csv'}\n\n{chosen.bnb_config_code()}")
    return 0


def _export(args) -> int:
    from quantplan.analysis import resolve_source
    from quantplan.analysis.models import dtype_from_name
    from quantplan.planner.budget import format_bytes
    from quantplan.planner.export import export
    from quantplan.planner.plan_types import Plan

    result = export(resolve_source(args.model), Plan.load(args.plan), args.out, overwrite=args.overwrite,
                    compute_dtype=dtype_from_name(args.compute_dtype), device=args.device)
    print(f"quantplan: wrote {result.path}: get_memory_footprint() {format_bytes(result.footprint_bytes)}, "
          f"{result.kept} modules 16-bit, {result.quantized} 4-bit")
    return 0


def _run(args) -> int:
    from quantplan.compare_cli import options_from_args

    from .pipeline import run

    compare = None if args.no_compare else options_from_args(args)
    run(args.model, args.budget, args.out, _analyze_options(args), overwrite=args.overwrite, priors=args.priors,
        compare=compare, refine=args.refine, verify=not args.no_verify, max_batches=args.end_to_end_batches,
        **_plan_options(args))
    return 0


def _analyze_options(args):
    from .pipeline import AnalyzeOptions

    return AnalyzeOptions(calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                          formats=args.formats, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                          device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          resume=args.resume, progress=not args.quiet, fisher=not args.no_fisher,
                          images=args.images, prompt=args.prompt, text_only=args.text_only,
                          max_memory=args.max_memory, context=args.context)


def _plan_options(args) -> dict:
    tiers = [t.strip() for t in args.tiers.split(",")] if args.tiers else None
    return {"objective": args.objective, "tiers": tiers, "keep": args.keep, "quantize": args.quantize,
            "vllm_safe": args.vllm_safe, "whole_blocks": args.whole_blocks}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantplan", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    analyze = sub.add_parser("analyze", help="measure per-module sensitivity -> sensitivity.parquet")
    _model_arg(analyze)
    _analyze_args(analyze)
    analyze.add_argument("--out", required=True, help="folder for sensitivity.parquet/.json")
    analyze.set_defaults(handler=_analyze)

    plan = sub.add_parser("plan", help="choose 16-bit modules under a budget -> plan.json, pareto.csv")
    plan.add_argument("--table", required=True, help="folder holding sensitivity.parquet")
    plan.add_argument("--out", help="folder for plan.json and pareto.csv (default: the table's folder)")
    _plan_args(plan)
    plan.set_defaults(handler=_plan)

    export = sub.add_parser("export", help="write the dynamic-bnb-4bit checkpoint of a plan")
    _model_arg(export)
    export.add_argument("--plan", required=True, help="plan.json (or its folder)")
    export.add_argument("--out", required=True, help="checkpoint folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    export.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    export.set_defaults(handler=_export)

    add_compare_parser(sub)

    run = sub.add_parser("run", help="analyze -> plan -> export -> compare + report (the main job)")
    _model_arg(run)
    _analyze_args(run)
    _plan_args(run)
    add_compare_args(run)
    run.add_argument("--out", help="output folder (default ./<model-name>-dynamic-bnb-4bit)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    run.add_argument("--no-compare", action="store_true", help="skip the fidelity scoreboard and report")
    run.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                     help="re-plan on measured KL gradients in ROUNDS rounds (each one forward+backward pass over "
                          "the calibration batches; default 0: off)")
    run.add_argument("--no-verify", action="store_true",
                     help="skip the check that the plan's calibration KL beats all-4-bit (and the fallback)")
    run.add_argument("--end-to-end-batches", type=int, default=None, metavar="N",
                     help="calibration batches used by --refine and the verification (default: all)")
    run.set_defaults(handler=_run)
    return parser


def _model_arg(p):
    p.add_argument("model", nargs="?", default=None,
                   help=f"hub id, local folder, or nothing for the offline default ({DEFAULT_MODEL}: SmolLM2-135M-Instruct)")


def _analyze_args(p):
    p.add_argument("--calib", help="calibration source: file/folder (txt/json/jsonl/csv/parquet) or hub "
                                   "dataset NAME[:CONFIG][@SPLIT]; default: the shipped English set")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--formats", default="nf4", help="candidate formats, e.g. nf4,fp4,int8 (default nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (transformers exports 64)")
    p.add_argument("--no-double-quant", action="store_true", help="measure 4-bit without double quantization")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype to analyze in")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resume", action="store_true", help="continue an interrupted analysis in --out")
    p.add_argument("--images", metavar="DIR",
                   help="images for a vision-language model: a folder, a file, or 'default' (the shipped photos)")
    p.add_argument("--prompt", help="prompt for every image in --images (default: the folder's prompts.json, "
                                    "else 'Describe this image.')")
    p.add_argument("--text-only", action="store_true", help="calibrate a VLM's language model on text only")
    p.add_argument("--no-fisher", action="store_true",
                   help="skip the backward pass of the next-token loss (Fisher-weighted scores, ~2x the forward "
                        "cost): faster, but plans fall back to the weaker output-error objective")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="analyze a decoder LLM too large for memory one block at a time from its safetensors "
                        "files, holding about SIZE (2GB, 1500MiB); no Fisher scores (plans use output error)")
    p.add_argument("--context", action="store_true",
                   help="also measure each module in the all-4-bit model (quantized context: restore_gain, "
                        "context_output_rel_error; one more forward+backward pass; enables --objective restore)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _plan_args(p):
    p.add_argument("--budget", default="+10%", help="1.8GB, 1700MiB, +10%% (over all-4-bit) or 0.45x (of 16-bit)")
    p.add_argument("--objective", default="auto", choices=["auto", "output", "weight", "combined", "fisher", "restore"],
                   help="what the plan minimises; auto = fisher when the table has it, else output")
    p.add_argument("--tiers", help="formats the plan may use besides 16-bit (default: the table's 4-bit format)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN", help="always keep 16-bit")
    p.add_argument("--quantize", action="append", default=[], metavar="PATTERN", help="never keep 16-bit")
    p.add_argument("--vllm-safe", action="store_true", help="q/k/v and gate/up share a format (vLLM fuses them)")
    p.add_argument("--whole-blocks", action="store_true", help="all Linears of a block share a format")
    p.add_argument("--priors", default="all",
                   help="rules that keep modules 16-bit unmeasured: all | none | projector,mllama_cross_attn_o_proj")
    p.add_argument("--no-priors", dest="priors", action="store_const", const="none", help="same as --priors none")


if __name__ == "__main__":
    sys.exit(main())
