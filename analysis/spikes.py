"""Error spikes: modules whose error stands out from the same module type in other layers.

Rule: for each (group, module_type), take the log of the output error along the layer axis and
its robust z-score, (v - median) / (1.4826 * MAD). A module with z > 3.5 (Iglewicz and
Hoaglin's outlier cut-off) is a spike. Logs, because errors span orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPIKE_Z = 3.5


def robust_z(values: pd.Series) -> pd.Series:
    """Robust z-score of log values; 0 where the spread is zero."""
    logs = np.log(values.clip(lower=1e-30))
    median = logs.median()
    mad = (logs - median).abs().median() * 1.4826
    if not np.isfinite(mad) or mad == 0:
        return pd.Series(0.0, index=values.index)
    return (logs - median) / mad


def find_spikes(rows: pd.DataFrame, column: str = "output_rel_error") -> pd.DataFrame:
    """Rows of one format whose ``column`` spikes within their (group, module_type); adds ``z``."""
    scored = rows[rows[column].notna() & rows["quantizable"]].copy()
    if scored.empty:
        return scored.assign(z=[])
    scored["z"] = scored.groupby(["group", "module_type"])[column].transform(robust_z)
    return scored[scored["z"] > SPIKE_Z].sort_values("z", ascending=False)
