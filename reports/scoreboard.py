"""The fidelity scoreboard: one row per variant, saved as ``scoreboard.csv``, shown in llama.cpp's style.

Rows: 16-bit, all-INT8 (bitsandbytes 8-bit: ``--report full``, in memory), all-4-bit, then for each dynamic plan the plan
and the heuristic baselines at its bytes (random: the mean of its seeds). The Markdown
table follows llama.cpp's ``llama-perplexity`` scoreboards (value ± standard error).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from quantplan.common.sizes import format_bytes

from .tables import markdown_table

COLUMNS = {
    "variant": "row name: 16-bit, all-INT8 (--report full, in memory), all-NF4, dynamic <budget>, <heuristic> @ <budget>",
    "kind": "reference | uniform | dynamic | heuristic",
    "plan": "budget spec of the dynamic plan the row belongs to (empty for the references)",
    "measured_with": "bitsandbytes (a real quantized load) | bitsandbytes (exported checkpoint, block by block) | "
                     "simulated (bitsandbytes round trip in a 16-bit model) | 16-bit",
    "kept_16bit": "Linear modules kept 16-bit",
    "bytes": "predicted checkpoint bytes of the weights (the planner's unit; equal-bytes comparisons use it)",
    "footprint_bytes": "model.get_memory_footprint(): measured for bitsandbytes loads, predicted for simulated rows",
    "mean_kld": "mean KL divergence from 16-bit over held-out tokens (nats)",
    "mean_kld_se": "standard error of mean_kld",
    "p99_kld": "99th percentile of the per-token KL divergence",
    "same_top_pct": "% of held-out tokens whose most likely next token equals 16-bit's",
    "same_top_se": "standard error of same_top_pct",
    "ppl": "perplexity on the held-out text",
    "ppl_se": "standard error of ppl",
    "simulated_mean_kld": "mean KLD with the weights round-tripped in the 16-bit model (the heuristic rows' "
                          "method; the verdict compares plans and heuristics on it, like for like)",
    "recovery_pct": "% of the all-4-bit row's mean KLD this row closes: 100·(1 − mean_kld / all-4-bit mean_kld)",
    "tokens": "held-out tokens measured",
    "note": "anything to know about the row (failures, seeds)",
}
METRICS = ("mean_kld", "mean_kld_se", "p99_kld", "same_top_pct", "same_top_se", "ppl", "ppl_se", "simulated_mean_kld")


def scoreboard_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with the documented columns; random seeds folded into one mean row."""
    merged = []
    for row in rows:
        if row.get("seed") is None:
            merged.append(row)
        elif not any(m.get("_group") == (row["plan"], row["variant"]) for m in merged):
            seeds = [r for r in rows if r.get("seed") is not None and (r["plan"], r["variant"]) ==
                     (row["plan"], row["variant"])]
            merged.append(_mean_of_seeds(seeds))
    frame = pd.DataFrame(merged)
    frame["recovery_pct"] = _recovery(frame)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan if column in METRICS else ""
    return frame[list(COLUMNS)]


def _recovery(frame: pd.DataFrame) -> pd.Series:
    """Share of the all-4-bit KL gap each row closes (NaN without an all-4-bit row): from the source weights' all-4-bit
    row where the plans hold channel-scaled ones (:mod:`reports.source_baseline`)."""
    four = frame[(frame["kind"] == "uniform") & ~frame["variant"].str.contains("INT8")] if "kind" in frame else frame[:0]
    base = frame["recovery_base"].fillna(False).astype(bool) if "recovery_base" in frame else None
    if base is not None and base.any():
        four = frame[base]
    if four.empty or not np.isfinite(four["mean_kld"].iloc[0]) or four["mean_kld"].iloc[0] <= 0:
        return pd.Series(np.nan, index=frame.index)
    return 100 * (1 - frame["mean_kld"] / four["mean_kld"].iloc[0])


def _mean_of_seeds(seeds: list[dict]) -> dict:
    row = dict(seeds[0])
    row["_group"] = (row["plan"], row["variant"])
    row["variant"] = f"{row['variant']} " + (f"(mean of {len(seeds)} seeds)" if len(seeds) > 1 else "(1 seed)")
    for key in (*METRICS, "bytes", "footprint_bytes", "kept_16bit"):
        row[key] = float(np.mean([s.get(key, np.nan) for s in seeds]))
    for key in ("bytes", "footprint_bytes", "kept_16bit"):
        row[key] = int(round(row[key]))
    each = ", ".join(f"seed {s['seed']}: {s['mean_kld']:.6f}" for s in seeds)
    row["note"] = f"mean KLD per seed: {each}"
    return row


def to_markdown(board: pd.DataFrame) -> str:
    """The scoreboard as a Markdown table in llama.cpp's style, the rows' notes as footnotes below it."""
    shown = display_frame(board)
    table = markdown_table(shown, align={c: "right" for c in DISPLAY_NUMERIC})
    notes = footnotes(board)
    return table + ("\n\n" + "\n".join(f"{mark} {text}  " for mark, text in notes) if notes else "")


DISPLAY_NUMERIC = ("Kept 16-bit", "Size", "Footprint", "PPL", "ΔPPL", "Mean KLD", "99% KLD", "Simulated KLD", "Recovery",
                   "Same top")


def display_frame(board: pd.DataFrame) -> pd.DataFrame:
    """The scoreboard as formatted strings (value ± standard error), one row per variant."""
    reference_ppl = board.loc[board["kind"] == "reference", "ppl"]
    base = float(reference_ppl.iloc[0]) if len(reference_ppl) else np.nan
    shown = pd.DataFrame({
        "Variant": board["variant"],
        "Kept 16-bit": board["kept_16bit"],
        "Size": [format_bytes(b) for b in board["bytes"]],
        "Footprint": [format_bytes(b) + ("" if m.startswith(("bitsandbytes", "16-bit")) else " (pred.)")
                      for b, m in zip(board["footprint_bytes"], board["measured_with"], strict=True)],
        "PPL": [_pm(v, e, 4) for v, e in zip(board["ppl"], board["ppl_se"], strict=True)],
        "ΔPPL": [_num(v - base, 4, signed=True) for v in board["ppl"]],
        "Mean KLD": [_pm(v, e, 6) for v, e in zip(board["mean_kld"], board["mean_kld_se"], strict=True)],
        "99% KLD": [_num(v, 6) for v in board["p99_kld"]],
        "Simulated KLD": [_num(v, 6) for v in board["simulated_mean_kld"]],
        "Recovery": [_num(v, 1) + "%" if np.isfinite(v) else "n/a" for v in board["recovery_pct"]],
        "Same top": [_pm(v, e, 2, "%") for v, e in zip(board["same_top_pct"], board["same_top_se"], strict=True)],
        "Measured with": [m.split(" (")[0] for m in board["measured_with"]],
    })
    marks = dict(zip(_noted(board), (mark for mark, _ in footnotes(board)), strict=True))
    shown["Variant"] = [f"{v} {marks[i]}" if i in marks else v for i, v in zip(board.index, board["variant"],
                                                                               strict=True)]
    return shown


def footnotes(board: pd.DataFrame) -> list[tuple[str, str]]:
    """The rows' notes as (mark, text), in row order: shown under the table (a Note column made it too
    wide for a laptop screen), each row marked in its Variant cell."""
    return [(f"[{n}]", str(board.at[i, "note"])) for n, i in enumerate(_noted(board), start=1)]


def _noted(board: pd.DataFrame) -> list:
    notes = board["note"].fillna("").astype(str).str.strip()
    return list(board.index[notes != ""])


def verdicts(board: pd.DataFrame) -> list[str]:
    """For each dynamic plan: does it beat every heuristic baseline at equal bytes (lower mean KLD)?

    Plans and heuristics are compared like for like: on ``simulated_mean_kld`` when both have
    it (the heuristics are only ever simulated), else on ``mean_kld``. A plan with two rows (under
    ``--max-memory``: simulated, and its exported checkpoint) gets one verdict, from its first row.
    """
    lines = []
    for _, dyn in board[board["kind"] == "dynamic"].drop_duplicates("plan").iterrows():
        rivals = board[(board["kind"] == "heuristic") & (board["plan"] == dyn["plan"])]
        simulated = np.isfinite(dyn.get("simulated_mean_kld", np.nan)) and rivals["simulated_mean_kld"].notna().all()
        column = "simulated_mean_kld" if simulated else "mean_kld"
        mine = dyn[column]
        if rivals.empty or not np.isfinite(mine) or rivals[column].isna().all():
            continue
        how = " (both simulated in the 16-bit model)" if simulated else ""
        best = rivals.loc[rivals[column].idxmin()]
        close = abs(best[column] - mine) < 2 * np.hypot(dyn["mean_kld_se"], best["mean_kld_se"])
        if best[column] > mine:
            lines.append(f"{dyn['variant']} wins: mean KLD {mine:.6f} vs the best heuristic at equal bytes, "
                         f"{best['variant']}, {best[column]:.6f}{how}"
                         + (" — within 2 standard errors: not a clear win." if close else "."))
        else:
            beaten = rivals[rivals[column] <= mine]
            names = ", ".join(f"{r['variant']} ({r[column]:.6f})" for _, r in beaten.iterrows())
            lines.append(f"{dyn['variant']} does NOT win: at equal bytes {names} reached a mean KLD no higher than "
                         f"the plan's {mine:.6f}{how}"
                         + (" — a tie within 2 standard errors" if close else "")
                         + ". The probe's per-module scores are not the best guide at this budget on this model; "
                         "consider that heuristic, or re-analyze with more calibration data.")
    return lines


def _num(value, digits: int, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(value, error, digits: int, unit: str = "") -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if error is None or not np.isfinite(error) or error == 0:
        return f"{value:.{digits}f}{unit}"
    return f"{value:.{digits}f} ± {error:.{digits}f}{unit}"
