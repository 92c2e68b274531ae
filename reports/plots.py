"""Plots: functions that take a sensitivity table (or the pareto curve and scoreboard) and return a Figure.

They use matplotlib's object API (no pyplot state), so they work headless, in notebooks and
in the report alike; :func:`save_figure` writes PNG and SVG. Panels are the model's groups
with blocks: vision tower, language model, cross-attention (and a projector with blocks).

Spikes (red rings) follow :mod:`analysis.spikes`: within each (group, module type), the log
error's robust z-score along the layer axis, (v − median) / (1.4826 · MAD), above 3.5.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from quantplan.analysis.spikes import SPIKE_Z, find_spikes

PANEL_GROUPS = ("vision_tower", "language_model", "cross_attention", "projector")
TITLES = {"vision_tower": "vision tower", "language_model": "language model", "cross_attention": "cross-attention",
          "projector": "projector"}


def plot_layer_errors(table, fmt: str | None = None, column: str = "output_rel_error") -> Figure:
    """``column`` per layer, one line per module type, one panel per group; spikes ringed and labelled."""
    rows = _block_rows(table, fmt)
    groups = _groups(rows)
    fig = Figure(figsize=(max(7.0, 4.8 * len(groups) + 1.4), 4.2), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    spikes = find_spikes(rows, column)
    for ax, group in zip(axes, groups, strict=True):
        part = rows[rows["group"] == group]
        for module_type, series in part.groupby("module_type", sort=False):
            series = series.sort_values("layer")
            ax.plot(series["layer"], series[column], marker=".", lw=1.2, label=module_type)
        flagged = spikes[spikes["group"] == group]
        ax.scatter(flagged["layer"], flagged[column], s=110, facecolors="none", edgecolors="red", lw=1.6,
                   zorder=5, label=f"spike (z > {SPIKE_Z})" if len(flagged) else None)
        for _, r in flagged.iterrows():
            ax.annotate(r["module_type"], (r["layer"], r[column]), textcoords="offset points", xytext=(4, 6),
                        fontsize=7, color="red")
        _log_scale_or_note(ax, part[column])
        ax.set_title(TITLES.get(group, group))
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_label(column, _fmt(table, fmt)))
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper")
    fig.suptitle(f"Output error per layer ({_fmt(table, fmt)})")
    return fig


def plot_weight_heatmap(table, fmt: str | None = None) -> Figure:
    """Relative weight error, module type x layer, one panel per group."""
    rows = _block_rows(table, fmt)
    groups = _groups(rows)
    fig = Figure(figsize=(max(6.0, 5.5 * len(groups)), 3.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        grid = rows[rows["group"] == group].pivot_table(index="module_type", columns="layer",
                                                        values="weight_rel_error", sort=False)
        image = ax.imshow(grid.values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=8)
        step = max(1, len(grid.columns) // 15)
        ax.set_xticks(range(0, len(grid.columns), step), [str(c) for c in grid.columns[::step]], fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(TITLES.get(group, group))
        fig.colorbar(image, ax=ax, label="‖W−Ŵ‖/‖W‖")
    fig.suptitle(f"Weight error ({_fmt(table, fmt)})")
    return fig


def plot_input_outliers(table) -> Figure:
    """Per layer: largest input |x| and outlier ratio (max/median channel), one line per distinct input."""
    rows = _block_rows(table, None)
    groups = _groups(rows)
    fig = Figure(figsize=(max(6.0, 4.8 * len(groups)), 6.0), layout="constrained")
    axes = fig.subplots(2, len(groups), squeeze=False, sharex="col")
    for col, group in enumerate(groups):
        part = rows[rows["group"] == group]
        for row, (column, label) in enumerate([("input_max_abs", "max |x| of the input"),
                                               ("input_outlier_ratio", "max / median channel max|x|")]):
            ax = axes[row][col]
            for name, series in _shared_inputs(part, column).items():
                ax.plot(series.index, series.values, marker=".", lw=1.2, label=name)
            _log_scale_or_note(ax, part[column])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(TITLES.get(group, group))
            else:
                ax.set_xlabel("layer")
        if axes[0][col].get_legend_handles_labels()[0]:  # no line where nothing was measured
            axes[0][col].legend(fontsize=7, ncols=2)
    fig.suptitle("Input outliers per layer (modules reading the same input share a line)")
    return fig


def plot_pareto(pareto: pd.DataFrame, scoreboard: pd.DataFrame | None = None, plans=()) -> Figure:
    """Bytes vs predicted error (left axis), with measured mean KLD of compared variants (right axis)."""
    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(pareto["bytes"] / 1e6, pareto["error"], marker="o", ms=3, color="C0", label="predicted error (exact plans)")
    xs = [*pareto["bytes"] / 1e6, *(p.predicted.bytes / 1e6 for p in plans)]
    if scoreboard is not None and len(scoreboard):
        xs += list(scoreboard["bytes"] / 1e6)
    ax.set_xlim(*_padded(min(xs), max(xs)))
    for p in plans:
        ax.scatter(p.predicted.bytes / 1e6, p.predicted.error, marker="*", s=160, color="C0", zorder=5)
        _label_inside(ax, f"plan {p.budget.spec}", p.predicted.bytes / 1e6, p.predicted.error,
                      fontsize=8, color="C0")
    ax.set_xlabel("weight bytes (MB, predicted checkpoint size)")
    ax.set_ylabel("predicted summed error", color="C0")
    ax.grid(alpha=0.3)
    if scoreboard is not None and len(scoreboard):
        right = ax.twinx()
        styles = {"dynamic": ("*", "C3", 150), "heuristic": ("x", "C1", 50), "uniform": ("s", "C2", 50),
                  "reference": ("o", "k", 50)}
        for kind, (marker, color, size) in styles.items():
            part = scoreboard[(scoreboard["kind"] == kind) & np.isfinite(scoreboard["mean_kld"])]
            if part.empty:
                continue
            right.scatter(part["bytes"] / 1e6, part["mean_kld"], marker=marker, color=color, s=size,
                          label=f"measured: {kind}", zorder=6)
        measured = scoreboard["mean_kld"][np.isfinite(scoreboard["mean_kld"])]
        right.set_ylim(*_padded(0.0, float(measured.max()) if len(measured) else 1.0))  # 16-bit's 0 not on the edge
        for kind, (_, color, _) in styles.items():
            part = scoreboard[(scoreboard["kind"] == kind) & np.isfinite(scoreboard["mean_kld"])]
            for _, r in part.iterrows():
                _label_inside(right, re.sub(r" \((mean of \d+ seeds|1 seed)\)", "", r["variant"]), r["bytes"] / 1e6,
                              r["mean_kld"], fontsize=7, color=color)
        right.set_ylabel("measured mean KLD vs 16-bit (nats)", color="C3")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper right")
    else:
        ax.legend(fontsize=8)
    fig.suptitle("Pareto curve: bytes vs predicted error, with measured KLD")
    return fig


def _measured(values: pd.Series) -> bool:
    """Whether any value is positive and finite: a group no calibration token reached (a VLM's vision tower
    under ``--text-only``) has only NaN activation statistics."""
    values = pd.to_numeric(values, errors="coerce")
    return bool(((values > 0) & np.isfinite(values)).any())


def _log_scale_or_note(ax, values: pd.Series) -> None:
    """A log y-axis where ``values`` has something to show, else a note on the empty panel (matplotlib refuses a
    log scale over no positive value)."""
    if _measured(values):
        ax.set_yscale("log")
        return
    ax.text(0.5, 0.5, "not measured:\nno calibration token reached\nthese modules (text-only data?)",
            transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")


def _padded(low: float, high: float, share: float = 0.08) -> tuple[float, float]:
    """Axis limits with room around the data, so markers at the extremes are not cut by the frame."""
    span = (high - low) or abs(high) or 1.0
    return low - share * span, high + share * span


def _label_inside(ax, text: str, x: float, y: float, **style) -> None:
    """Annotate a point on the side that stays inside the axes: left of points in the right third,
    above points in the bottom fifth (the axis limits must be set first)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    right = (x - x0) / (x1 - x0) > 2 / 3
    low = (y - y0) / (y1 - y0) < 0.2
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(-6 if right else 6, 5 if low else -10),
                ha="right" if right else "left", **style)


def save_figure(fig: Figure, folder: str | Path, stem: str, dpi: int = 90) -> dict[str, Path]:
    """Write ``stem.png`` and ``stem.svg`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"png": folder / f"{stem}.png", "svg": folder / f"{stem}.svg"}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "quantplan"}):
        fig.savefig(paths["png"], dpi=dpi)
        fig.savefig(paths["svg"], metadata={"Date": None})
    return paths


def spike_table(table, fmt: str | None = None, column: str = "output_rel_error") -> pd.DataFrame:
    """The flagged modules: name, group, layer, module type, error and robust z."""
    spikes = find_spikes(table.for_format(_fmt(table, fmt)), column)
    return spikes[["name", "group", "layer", "module_type", column, "z"]].reset_index(drop=True)


def _block_rows(table, fmt) -> pd.DataFrame:
    rows = table.for_format(_fmt(table, fmt))
    return rows[(rows["kind"] == "Linear") & (rows["layer"] >= 0) & rows["group"].isin(PANEL_GROUPS)
                & rows["quantizable"]]


def _groups(rows: pd.DataFrame) -> list[str]:
    groups = [g for g in PANEL_GROUPS if (rows["group"] == g).any()]
    if not groups:
        raise ValueError("the table has no quantizable Linear inside a block: nothing to plot per layer")
    return groups


def _shared_inputs(part: pd.DataFrame, column: str) -> dict[str, pd.Series]:
    """One series per distinct input: module types whose values coincide on every layer share a line."""
    grid = part.pivot_table(index="layer", columns="module_type", values=column, sort=False)
    lines: dict[str, pd.Series] = {}
    for module_type in grid.columns:
        series = grid[module_type]
        same = next((k for k, v in lines.items() if np.allclose(v.values, series.values, equal_nan=True)), None)
        if same is None:
            lines[module_type] = series
        else:
            lines[f"{same}/{module_type}"] = lines.pop(same)
    return lines


def _fmt(table, fmt) -> str:
    return fmt or table.formats[0]


def _label(column: str, fmt: str) -> str:
    return {"output_rel_error": f"‖ΔY‖²/‖Y‖² ({fmt})", "weight_rel_error": f"‖ΔW‖/‖W‖ ({fmt})"}.get(column, column)
