"""The one-screen summary printed after an analysis."""

from __future__ import annotations

from .spikes import find_spikes
from .table import SensitivityTable


def summarize(table: SensitivityTable, top: int = 10) -> str:
    """Top modules by output error and the spikes, for the first measured format."""
    fmt = table.formats[0]
    rows = table.for_format(fmt)
    quantizable = rows[rows["quantizable"]]
    lines = [
        f"model {table.meta.get('model_id')}: {len(quantizable)} quantizable Linear modules, "
        f"{(~rows['quantizable']).sum()} listed as not quantizable; "
        f"{table.meta['calibration']['tokens']} calibration tokens; formats {', '.join(table.formats)}",
        f"top {top} by {fmt} output error (‖ΔY‖²/‖Y‖²):",
    ]
    for _, r in quantizable.nlargest(top, "output_rel_error").iterrows():
        lines.append(f"  {r['output_rel_error']:9.4g}  weight {r['weight_rel_error']:.3f}  {r['name']}")
    if "output_fisher_error" in quantizable and quantizable["output_fisher_error"].notna().any():
        windows, total = table.meta.get("fisher_samples"), table.meta["calibration"].get("samples")
        source = (f"gradients of the first {windows} of {total} calibration windows" if windows and windows != total
                  else "gradients of every calibration window")
        lines.append(f"top {top} by Fisher-weighted error (next-token loss units, {source}, --fisher-samples; what "
                     "the default plan minimises):")
        for _, r in quantizable.nlargest(top, "output_fisher_error").iterrows():
            lines.append(f"  {r['output_fisher_error']:9.4g}  {r['name']}")
    spikes = find_spikes(rows)
    lines.append(f"spikes (robust z > 3.5 within module type): {len(spikes)}")
    for _, r in spikes.head(top).iterrows():
        lines.append(f"  z={r['z']:5.1f}  {r['output_rel_error']:9.4g}  {r['name']}")
    flagged = rows[rows["nonfinite_tokens"] > 0]
    if len(flagged):
        lines.append(f"NaN/Inf inputs seen (tokens skipped) in {len(flagged)} modules, e.g. {flagged['name'].iloc[0]}")
    not_q = rows[~rows["quantizable"] & (rows["kind"] == "Linear")]
    for _, r in not_q.iterrows():
        lines.append(f"  kept 16-bit, not quantizable: {r['name']}: {r['reason']}")
    return "\n".join(lines)
