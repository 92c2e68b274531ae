"""``quantplan compare``: its arguments and handler, for ``quantplan.cli`` to mount with one call.

``add_compare_parser(subparsers)`` adds the sub-command; errors are the user errors
``quantplan.cli.main`` already reports in one line (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from quantplan.reports.compare import CompareConfig, ReportDepth
from quantplan.reports.generations import PROMPTS

EXAMPLE = ("example:\n  quantplan compare --plan out/plan.json --out out/\n"
           "  quantplan compare --plan a/plan.json --plan b/plan.json --out cmp/ --heldout-samples 16")


def add_compare_parser(subparsers, formatter_class=None):
    """Add ``compare`` to an argparse sub-parser collection; returns the new parser."""
    summary = "measure 16-bit, INT8, 4-bit, plans and baselines on held-out text -> scoreboard, report"
    p = subparsers.add_parser("compare", help=summary, description=summary, epilog=EXAMPLE,
                              **({"formatter_class": formatter_class} if formatter_class else {}))
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder, or nothing for the offline default (SmolLM2-135M-Instruct)")
    io = p.add_argument_group("input and output")
    io.add_argument("--plan", action="append", required=True, metavar="PLAN",
                    help="plan.json (or its folder); repeat to compare several budgets")
    io.add_argument("--out", required=True, help="folder for scoreboard.csv/.md, report.html/.md and plots")
    io.add_argument("--table", help="folder of the sensitivity table the plans came from (default: the first plan's)")
    group = add_compare_args(p)
    group.add_argument("--device", default=CompareConfig().device, help="cpu | cuda | cuda:N")
    group.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="dtype of the 16-bit model and the simulated variants (auto: bf16 on a GPU and on CPUs "
                            "with native bf16, else fp32)")
    group.add_argument("--quiet", action="store_true", help="no progress lines (results still print)")
    group.add_argument("--max-memory", metavar="SIZE", default=None,
                       help="a model larger than memory: measure the simulated rows block by block under this cap "
                            "(e.g. 2GB); real all-INT8/all-4-bit loads, generations and single-module checks are "
                            "skipped")
    group.add_argument("--checkpoint", metavar="DIR", default=None,
                       help="with --max-memory: the first plan's exported checkpoint (OUT/checkpoint), measured block "
                            "by block through bitsandbytes")
    p.set_defaults(handler=run_compare)
    return p


def add_compare_args(p, default_depth: ReportDepth = ReportDepth.FULL):
    """The measurement options, in a "report" group (returned); names do not clash with ``run``'s.

    ``default_depth`` is ``--report``'s default: ``run`` asks for a quick report, ``compare`` for a full one.
    """
    d = CompareConfig()
    group = p.add_argument_group("report (fidelity scoreboard on held-out text)")
    group.add_argument("--heldout", default=d.heldout,
                       help="held-out text, disjoint from calibration: 'heldout' (shipped), a file/folder or hub dataset")
    group.add_argument("--heldout-samples", type=int, default=d.samples, help="held-out windows")
    group.add_argument("--heldout-seq-len", type=int, default=d.seq_len, help="tokens per held-out window")
    group.add_argument("--compare-batch-size", type=int, default=d.batch_size, help="held-out windows per forward")
    group.add_argument("--gen-prompt", action="append", metavar="TEXT",
                       help=f"prompt for the side-by-side generations (repeatable; default: {len(PROMPTS)} fixed prompts)")
    group.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per generation")
    group.add_argument("--top-k", type=int, default=d.top_k, help="predicted vs measured: most sensitive modules")
    group.add_argument("--random-k", type=int, default=d.random_k, help="predicted vs measured: random other modules")
    group.add_argument("--agreement-samples", type=int, default=d.agreement_samples,
                       help="held-out windows per single-module measurement")
    group.add_argument("--no-baselines", action="store_true", help="skip the heuristic baselines")
    group.add_argument("--report", choices=[d.value for d in ReportDepth], default=default_depth.value,
                       help="quick: scoreboard, recovery and baselines (one random seed), without the single-module "
                            "predicted-vs-measured checks, the generations, the real bitsandbytes load of all-INT8 "
                            "(no row) and that of all-4-bit (its row simulated); full: everything "
                            f"(default: {default_depth.value})")
    return group


def compare_config_from_args(args) -> CompareConfig:
    """The :class:`CompareConfig` the parsed arguments of :func:`add_compare_args` describe."""
    return CompareConfig(heldout=args.heldout, samples=args.heldout_samples, seq_len=args.heldout_seq_len,
                         batch_size=args.compare_batch_size, prompts=tuple(args.gen_prompt) if args.gen_prompt else PROMPTS,
                         max_new_tokens=args.max_new_tokens, top_k=args.top_k, random_k=args.random_k,
                         agreement_samples=args.agreement_samples, baselines=not args.no_baselines,
                         device=args.device, dtype=args.dtype, progress=not args.quiet,
                         report=ReportDepth(args.report))


def run_compare(args) -> int:
    """Handler of ``quantplan compare``."""
    from quantplan.reports.run import compare_and_report

    first = Path(args.plan[0])
    folder = first if first.is_dir() else first.parent
    compare_and_report(args.model, args.table or folder, args.plan, args.out,
                       pareto=Path(args.table or folder) / "pareto.csv",
                       options=replace(compare_config_from_args(args), max_memory=args.max_memory),
                       checkpoint=args.checkpoint)
    return 0
