"""Where a whole ``quantplan run`` spends its time: the stage profile, and the run / analysis ratio.

Runs ``python -m quantplan run MODEL --out TMP [run options]`` as its user would, reads the
``profile.json`` the run writes (one entry per stage: wall seconds, peak resident memory; see
``quantplan.common.profile``) and records it under ``--label`` in ``--out`` (other labels already
there are kept, so a tiny and a SmolLM2 run share one file). The ratio is the whole run's wall
seconds over its ``analysis`` stage, also in CPU seconds (the process's, all threads: what the load of a
shared machine does not inflate); target (issue #15): <= 2.5x. Results:
``benchmarks/results/stage_profile.json``.

    python benchmarks/stage_profile.py --model FOLDER --label tiny [--out results.json] [quantplan run options]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.5


def profile_run(model: str | None, run_args: list[str]) -> dict:
    """One ``quantplan run`` in a temporary folder: its command, wall time, profile and ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "quantplan", "run", *([model] if model else []), "--out", f"{tmp}/job",
                   *run_args]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"quantplan run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        profile = json.loads((Path(tmp) / "job" / "profile.json").read_text())
        plan = json.loads((Path(tmp) / "job" / "plan.json").read_text())
        scoreboard = _scoreboard(Path(tmp) / "job" / "scoreboard.csv")
    top = {s["name"]: s["seconds"] for s in profile["stages"] if s["depth"] == 0}
    top_cpu = {s["name"]: s.get("cpu_seconds") for s in profile["stages"] if s["depth"] == 0}
    analysis, analysis_cpu = top.get("analysis", float("nan")), top_cpu.get("analysis")
    return {"command": ["quantplan", "run", *command[4:]], "process_wall_s": wall, "profile": profile,
            "top_level_s": top, "run_over_analysis": profile["total_seconds"] / analysis if analysis else None,
            "top_level_cpu_s": top_cpu,  # CPU seconds: the ratio a shared machine's load does not skew
            "run_over_analysis_cpu": profile["total_cpu_seconds"] / analysis_cpu if analysis_cpu else None,
            "target_run_over_analysis": TARGET_RATIO,
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in profile["stages"]),
            "plan_choices": plan["choices"],  # runs under other options (--dtype) compare their plans
            "verified_kld": _verified_kld(plan),
            "scoreboard": scoreboard}  # held-out mean KLD and recovery per row (None without a report)


def _scoreboard(path: Path) -> list[dict] | None:
    """The fidelity scoreboard's rows (variant, how measured, mean KLD, recovery %), None when not written."""
    if not path.is_file():
        return None
    import csv

    with path.open() as f:
        return [{"variant": row["variant"], "measured_with": row["measured_with"],
                 "mean_kld": float(row["mean_kld"]) if row["mean_kld"] else None,
                 "recovery_pct": float(row["recovery_pct"]) if row["recovery_pct"] else None}
                for row in csv.DictReader(f)]


def _verified_kld(plan: dict) -> float | None:
    """The calibration KL the verification measured for the shipped plan (None without verification)."""
    verification = plan.get("checks", {}).get("verification") or {}
    return verification.get("calibration_kld", {}).get(verification.get("chosen"))


def main(argv: list[str] | None = None) -> int:
    """Run one profiled ``quantplan run`` and merge it into ``--out`` under ``--label``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or hub id (default: the offline default)")
    parser.add_argument("--label", default="run", help="key of this run in the results file")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stage_profile.json"))
    args, run_args = parser.parse_known_args(argv)  # every other option is quantplan run's
    args.run_args = [a for a in run_args if a != "--"]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    results["runs"][args.label] = {**profile_run(args.model, args.run_args), "machine": machine_info()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    run = results["runs"][args.label]
    print(f"{args.label}: run {run['profile']['total_seconds']:.1f} s, analysis {run['top_level_s'].get('analysis', 0):.1f} s,"
          f" ratio {run['run_over_analysis']:.2f}x, in CPU seconds {run['run_over_analysis_cpu']:.2f}x"
          f" (target <= {TARGET_RATIO}x); peak RSS "
          f"{run['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
