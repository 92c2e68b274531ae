"""The quantplan command: analyze, plan, export, compare, and run (all of them, the main job).

Each sub-command takes --help; `quantplan run` with no argument runs the offline default
(SmolLM2-135M-Instruct) at +10 % over all-4-bit.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from quantplan.common.noise import quiet_progress, silence_library_noise
from quantplan.reports.compare import ReportDepth

from .compare_cli import add_compare_args, add_compare_parser, compare_config_from_args
from .endtoend import DEFAULT_TOKENS

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, OSError)
DEFAULT_MODEL_HELP = "hub id, local folder, or nothing for the offline default (SmolLM2-135M-Instruct)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; user errors print one line and exit 2."""
    silence_library_noise()
    args = _parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_progress()
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.handler(args) or 0
        except KeyboardInterrupt as err:
            reason = str(err).strip("'\" ") or "nothing of the unfinished step was written; re-run the same command"
            print(f"quantplan: interrupted: {reason}", file=sys.stderr)
            return 130
        except USER_ERRORS as err:
            print(f"quantplan: error: {err}", file=sys.stderr)
            return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one ``quantplan: warning:`` line, without the source path and line of the warner."""
    print(f"quantplan: warning: {message}", file=sys.stderr)


# -- handlers: each builds its configuration once and passes it whole -----------------------------------

def _analyze(args) -> int:
    from quantplan.analysis import resolve_source
    from quantplan.pipeline import analyze_model

    if args.dry_run:
        return _dry_run(args)
    analyze_model(resolve_source(args.model), args.out, analyze_config_from_args(args))
    print(f"quantplan: wrote {Path(args.out) / 'sensitivity.parquet'} and sensitivity.json")
    return 0


def _plan(args) -> int:
    from quantplan.analysis.table import SensitivityTable
    from quantplan.pipeline import plan_and_save

    out = Path(args.out or args.table)
    chosen = plan_and_save(SensitivityTable.load(args.table), args.budget, out, plan_config_from_args(args))
    print(f"quantplan: wrote {out / 'plan.json'} and {out / 'pareto.csv'}\n\n{chosen.bnb_config_code()}")
    return 0


def _export(args) -> int:
    from quantplan.analysis import resolve_source
    from quantplan.analysis.models import dtype_from_name
    from quantplan.pipeline import export_summary
    from quantplan.planner.export import export
    from quantplan.planner.plan_types import Plan

    plan = Plan.load(args.plan)
    result = export(resolve_source(args.model), plan, args.out, overwrite=args.overwrite,
                    compute_dtype=dtype_from_name(args.compute_dtype), device=args.device)
    print(export_summary(Path(args.out), plan, result))
    return 0


def _run(args) -> int:
    from quantplan.endtoend import EndToEnd
    from quantplan.pipeline import run

    if args.dry_run:
        return _dry_run(args)
    compare = None if args.no_compare else compare_config_from_args(args)
    end_to_end = EndToEnd(refine=args.refine, verify=not args.no_verify, **_end_to_end_batches(args.end_to_end_batches))
    run(args.model, args.budget, args.out, analyze_config_from_args(args), plan_config=plan_config_from_args(args),
        compare=compare, end_to_end=end_to_end, overwrite=args.overwrite)
    return 0


def _batches_or_all(text: str) -> int | str:
    """``--end-to-end-batches``: a positive number of batches, or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of batches of at least 1, or all")
    return value


def _end_to_end_batches(value: int | str | None) -> dict:
    """EndToEnd's batch bound from ``--end-to-end-batches`` (None: the default token bound; all: none)."""
    if value == "all":
        return {"max_batches": None, "max_tokens": None}
    return {} if value is None else {"max_batches": value}


def _dry_run(args) -> int:
    from quantplan.analysis import resolve_source
    from quantplan.dry_run import describe, dry_run

    print(describe(dry_run(resolve_source(args.model), analyze_config_from_args(args))))
    return 0


def analyze_config_from_args(args):
    """The :class:`AnalyzeConfig` the parsed ``analyze``/``run`` arguments describe."""
    from quantplan.analysis.config import AnalyzeConfig

    return AnalyzeConfig(calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                         formats=args.formats, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                         device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                         resume=args.resume, progress=not args.quiet, fisher=not args.no_fisher,
                         fisher_samples=args.fisher_samples, images=args.images, prompt=args.prompt, text_only=args.text_only,
                         max_memory=args.max_memory, context=args.context,
                         equalize=getattr(args, "equalize", None))


def plan_config_from_args(args):
    """The :class:`PlanConfig` the parsed ``plan``/``run`` arguments describe."""
    from quantplan.planner.config import PlanConfig

    tiers = tuple(t.strip() for t in args.tiers.split(",")) if args.tiers else None
    kv_batch = getattr(args, "kv_batch", None)  # absent unless given (its help states the default)
    if kv_batch is not None and args.kv_context is None:
        raise ValueError("--kv-batch sizes the KV cache of --kv-context: give --kv-context too (or drop --kv-batch)")
    return PlanConfig(objective=args.objective, tiers=tiers, keep=tuple(args.keep), quantize=tuple(args.quantize),
                      vllm_safe=args.vllm_safe, whole_blocks=args.whole_blocks, priors=args.priors,
                      kv_context=args.kv_context, kv_batch=kv_batch or 1)


# -- the parser ----------------------------------------------------------------------------------------

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text; descriptions and examples keep their line breaks."""


EXAMPLES = {
    "analyze": "example:\n  quantplan analyze --out out/ --samples 32 --seq-len 256\n"
               "  quantplan analyze Qwen/Qwen2-VL-2B-Instruct --images default --out out/",
    "plan": "example:\n  quantplan plan --table out/ --budget +10%\n  quantplan plan --table out/ --budget 1.8GB --vllm-safe"
            "\n  quantplan plan --table out/ --budget 8GB --kv-context 8192 --kv-batch 1   # device budget",
    "export": "example:\n  quantplan export --plan out/plan.json --out out/checkpoint",
    "run": "examples:\n  quantplan run                                   # the offline default, +10 % over all-4-bit\n"
           "  quantplan run ./my-model --budget 0.45x --out my-model-4bit\n"
           "  quantplan run --budget +33% --no-compare        # re-plan and export, reusing the saved table",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantplan", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    analyze = _command(sub, "analyze", "measure per-module sensitivity -> sensitivity.parquet")
    _model_arg(analyze)
    _analyze_args(analyze)
    analyze.add_argument_group("output").add_argument("--out", required=True,
                                                       help="folder for sensitivity.parquet/.json")

    plan = _command(sub, "plan", "choose 16-bit modules under a budget -> plan.json, pareto.csv (seconds)")
    io = plan.add_argument_group("input and output")
    io.add_argument("--table", required=True, help="folder holding sensitivity.parquet")
    io.add_argument("--out", help="folder for plan.json and pareto.csv (default: the table's folder)")
    _plan_args(plan)

    export = _command(sub, "export", "write the dynamic-bnb-4bit checkpoint of a plan")
    _model_arg(export)
    io = export.add_argument_group("input and output")
    io.add_argument("--plan", required=True, help="plan.json (or its folder)")
    io.add_argument("--out", required=True, help="checkpoint folder to create")
    io.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds a checkpoint quantplan wrote (any other folder is refused)")
    _export_args(export)

    add_compare_parser(sub, _Formatter)

    run = _command(sub, "run", "analyze -> plan -> export -> compare + report (the main job)")
    _model_arg(run)
    _analyze_args(run)
    _plan_args(run)
    checks = run.add_argument_group("end-to-end checks (run the model on the plan before export)")
    checks.add_argument("--no-verify", action="store_true",
                        help="skip the check that the plan's calibration KL beats all-4-bit (and the fallback)")
    checks.add_argument("--refine", type=int, default=None, metavar="ROUNDS",
                        help="re-plan on measured KL gradients in ROUNDS rounds (each one forward+backward pass "
                             "over the calibration batches). Default: 4 rounds, only when the verification finds "
                             "that 4-bit breaks the model badly (planner/auto_refine.py); 0: never")
    checks.add_argument("--end-to-end-batches", type=_batches_or_all, default=None, metavar="N|all",
                        help="calibration batches used by --refine and the verification (default: the first "
                             f"{DEFAULT_TOKENS} tokens' worth; all: every calibration batch)")
    out = run.add_argument_group("output")
    out.add_argument("--out", help="output folder (default: ./<model-name>-dynamic-bnb-4bit)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the checkpoint in --out if quantplan wrote it (any other folder is refused)")
    report = add_compare_args(run, ReportDepth.QUICK)
    report.add_argument("--no-compare", action="store_true",
                        help="skip the fidelity scoreboard and report (the slowest step after the analysis)")
    return parser


def _command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    handler = {"analyze": _analyze, "plan": _plan, "export": _export, "run": _run}[name]
    p = sub.add_parser(name, help=summary, description=summary, epilog=EXAMPLES[name], formatter_class=_Formatter)
    p.set_defaults(handler=handler)
    return p


def _model_arg(p):
    p.add_argument("model", nargs="?", default=None, help=DEFAULT_MODEL_HELP)


def _analyze_args(p):
    calib = p.add_argument_group("calibration data")
    calib.add_argument("--calib", help="file/folder (txt/json/jsonl/csv/parquet) or hub dataset NAME[:CONFIG][@SPLIT] "
                                       "(default: the shipped English set)")
    calib.add_argument("--samples", type=int, default=32, help="calibration windows")
    calib.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    calib.add_argument("--seed", type=int, default=0, help="sampling seed")
    calib.add_argument("--images", metavar="DIR",
                       help="images for a vision-language model: a folder, a file, or 'default' (the shipped photos)")
    calib.add_argument("--prompt", help="prompt for every image in --images (default: the folder's prompts.json, "
                                        "else 'Describe this image.')")
    calib.add_argument("--text-only", action="store_true", help="calibrate a VLM's language model on text only")
    measure = p.add_argument_group("measurement")
    measure.add_argument("--formats", default=None,
                         help="candidate formats, e.g. nf4,fp4,int8 (default: the blocksize menu nf4,nf4-bs32, each "
                              "module at blocksize 64 or 32 or 16-bit; nf4 alone for skip-list-only plans that a "
                              "pasteable BitsAndBytesConfig expresses)")
    measure.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (transformers exports 64)")
    measure.add_argument("--no-double-quant", action="store_true", help="measure 4-bit without double quantization")
    measure.add_argument("--no-fisher", action="store_true",
                         help="skip the backward pass of the next-token loss (Fisher-weighted scores, ~0.7x the "
                              "forward's cost by default): faster, but plans fall back to the weaker output-error "
                              "objective")
    measure.add_argument("--fisher-samples", type=int, default=None, metavar="N",
                         help="the Fisher pass backpropagates the first N calibration windows (rounded up to whole "
                              "batches; the others run forward only, for the input statistics). Default: a quarter of the "
                              "calibration windows, at least 8; N >= --samples backpropagates every window")
    scales = measure.add_mutually_exclusive_group()
    scales.add_argument("--no-equalize", dest="equalize", action="store_false", default=None,
                        help="keep the source's weights as they are (default with the blocksize menu: power-of-two "
                             "channel scales between each norm and its Linears, and between up_proj and down_proj, "
                             "that leave the 16-bit outputs unchanged and lower the 4-bit error; the checkpoint then "
                             "holds the scaled weights)")
    scales.add_argument("--equalize", dest="equalize", action="store_true", default=None,
                        help="scale the channels with --formats too (a skip-list-only plan's BitsAndBytesConfig then "
                             "no longer reproduces the checkpoint from the source weights)")
    measure.add_argument("--context", action="store_true",
                         help="also measure each module in the all-4-bit model (restore_gain, context_output_rel_error;"
                              " one more forward+backward pass; enables --objective restore)")
    perf = p.add_argument_group("performance and memory")
    perf.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    perf.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                      help="dtype to analyze in (auto: bf16 on a GPU and on CPUs with native bf16, else fp32, whose "
                           "matmuls are several times faster there and which holds the weights at twice the bytes)")
    perf.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    perf.add_argument("--max-memory", metavar="SIZE", default="auto",
                      help="analyze a decoder LLM too large for memory one block at a time from its safetensors "
                           "files, holding about SIZE (2GB, 1500MiB) on --device (with cuda: GPU memory); auto: only "
                           "when the estimated in-memory peak exceeds the device's free memory (see --dry-run)")
    perf.add_argument("--resume", action="store_true", help="continue an interrupted analysis in --out")
    perf.add_argument("--dry-run", action="store_true",
                      help="print the estimated peak memory, the all-4-bit and 16-bit sizes and what the run would "
                           "do (in memory or streamed), from the config alone; load no weights")
    perf.add_argument("--quiet", action="store_true", help="no progress bars (results and warnings still print)")


def _plan_args(p):
    group = p.add_argument_group("plan")
    group.add_argument("--budget", default="+10%",
                       help="1.8GB, 1700MiB, +10%% (over all-4-bit) or 0.45x (of the 16-bit size); the weights', or "
                            "with --kv-context the device's (weights + KV cache + activations)")
    group.add_argument("--kv-context", type=int, metavar="TOKENS",
                       help="make --budget a device budget: subtract the 16-bit KV cache of this many tokens and the "
                            "prefill activations, plan the weights under the rest")
    group.add_argument("--kv-batch", type=int, metavar="N", help="sequences of --kv-context tokens (1 when not given)", default=argparse.SUPPRESS)
    group.add_argument("--objective", default="auto",
                       choices=["auto", "output", "weight", "combined", "fisher", "restore"],
                       help="what the plan minimises; auto = fisher when the table has it, else output")
    group.add_argument("--tiers", help="formats the plan may use besides 16-bit (default: the table's 4-bit formats, "
                                       "blocksize 64 first; --tiers nf4 on a menu table: skip-list-only)")
    group.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                       help="always keep 16-bit (glob, full name, or dotted prefix/suffix; repeatable)")
    group.add_argument("--quantize", action="append", default=[], metavar="PATTERN",
                       help="never keep 16-bit (repeatable)")
    group.add_argument("--vllm-safe", action="store_true", help="q/k/v and gate/up share a format (vLLM fuses them)")
    group.add_argument("--whole-blocks", action="store_true", help="all Linears of a block share a format")
    group.add_argument("--priors", default="all",
                       help="rules that keep modules 16-bit unmeasured: all | none | projector,mllama_cross_attn_o_proj")
    group.add_argument("--no-priors", dest="priors", action="store_const", const="none", help="same as --priors none")


def _export_args(p):
    group = p.add_argument_group("export")
    group.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (where the weights are quantized)")
    group.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                       help="bnb_4bit_compute_dtype of the checkpoint")


if __name__ == "__main__":
    sys.exit(main())
