"""``quantplan compare``: its arguments and handler, for ``quantplan.cli`` to mount with one call.

``add_compare_parser(subparsers)`` adds the sub-command; errors are the user errors
``quantplan.cli.main`` already reports in one line (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations

from pathlib import Path

from quantplan.analysis.models import DEFAULT_MODEL
from quantplan.reports.compare import CompareOptions
from quantplan.reports.generations import PROMPTS


def add_compare_parser(subparsers):
    """Add ``compare`` to an argparse sub-parser collection; returns the new parser."""
    p = subparsers.add_parser(
        "compare", help="measure 16-bit, INT8, 4-bit, plans and baselines on held-out text -> scoreboard, report")
    p.add_argument("model", nargs="?", default=None,
                   help=f"hub id, local folder, or nothing for the offline default ({DEFAULT_MODEL})")
    p.add_argument("--plan", action="append", required=True, metavar="PLAN",
                   help="plan.json (or its folder); repeat to compare several budgets")
    p.add_argument("--out", required=True, help="folder for scoreboard.csv/.md, report.html/.md and plots")
    p.add_argument("--table", help="folder of the sensitivity table the plans came from (default: the first plan's)")
    add_compare_args(p)
    p.set_defaults(handler=run_compare)
    return p


def add_compare_args(p) -> None:
    """The measurement options; names do not clash with ``run``'s, so ``run`` can take them too."""
    d = CompareOptions()
    p.add_argument("--heldout", default=d.heldout,
                   help="held-out text, disjoint from calibration: 'heldout' (shipped), a file/folder or hub dataset")
    p.add_argument("--heldout-samples", type=int, default=d.samples, help=f"held-out windows (default {d.samples})")
    p.add_argument("--heldout-seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    p.add_argument("--compare-batch-size", type=int, default=d.batch_size)
    p.add_argument("--gen-prompt", action="append", metavar="TEXT",
                   help=f"prompt for the side-by-side generations (repeatable; default: {len(PROMPTS)} fixed prompts)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--top-k", type=int, default=d.top_k, help="predicted vs measured: most sensitive modules")
    p.add_argument("--random-k", type=int, default=d.random_k, help="predicted vs measured: random other modules")
    p.add_argument("--agreement-samples", type=int, default=d.agreement_samples,
                   help="held-out windows per single-module measurement")
    p.add_argument("--no-baselines", action="store_true", help="skip the heuristic baselines")
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    if not any(a.dest == "quiet" for a in p._actions):
        p.add_argument("--quiet", action="store_true", help="no progress lines")


def options_from_args(args) -> CompareOptions:
    """CompareOptions from parsed arguments of :func:`add_compare_args`."""
    return CompareOptions(heldout=args.heldout, samples=args.heldout_samples, seq_len=args.heldout_seq_len,
                          batch_size=args.compare_batch_size, prompts=tuple(args.gen_prompt) if args.gen_prompt else PROMPTS,
                          max_new_tokens=args.max_new_tokens, top_k=args.top_k, random_k=args.random_k,
                          agreement_samples=args.agreement_samples, baselines=not args.no_baselines,
                          device=args.device, progress=not args.quiet)


def run_compare(args) -> int:
    """Handler of ``quantplan compare``."""
    from quantplan.reports.run import compare_and_report

    first = Path(args.plan[0])
    folder = first if first.is_dir() else first.parent
    compare_and_report(args.model, args.table or folder, args.plan, args.out,
                       pareto=Path(args.table or folder) / "pareto.csv", options=options_from_args(args))
    return 0
