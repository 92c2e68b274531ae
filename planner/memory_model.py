"""The byte model: what a choice of formats weighs, counted one way for the planner, the baselines and verification.

A model's predicted checkpoint bytes are the table's ``other_bytes`` (embeddings, norms, every
non-Linear) plus, per Linear, its ``bytes_16bit`` when kept 16-bit or the measured ``bytes`` of
its format; the predicted ``get_memory_footprint()`` adds ``other_footprint_bytes`` and the
formats' ``footprint_bytes`` the same way. "All-4-bit" is what a plain ``BitsAndBytesConfig``
load gives: every supported Linear in the 4-bit format except lm_head (transformers keeps it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from quantplan.analysis.table import SensitivityTable

from .plan_types import KEEP


@dataclass(frozen=True)
class Size:
    """Predicted checkpoint bytes and predicted ``get_memory_footprint()`` of one choice of formats."""

    bytes: int
    footprint_bytes: int


class ByteModel:
    """Every Linear's 16-bit and per-tier bytes (``frame``) plus the model's other bytes."""

    def __init__(self, table: SensitivityTable, tiers):
        linear = table.df[table.df["kind"] == "Linear"]
        if linear.empty:
            raise ValueError("the sensitivity table holds no Linear module: nothing to plan")
        self.tiers = list(tiers)
        from quantplan.analysis.formats import formats_of  # torch only when a byte model is built

        described = formats_of(table.meta.get("formats", []))
        self.formats = {t: described[t] for t in self.tiers if t in described}  # tier -> format value
        self.other = int(table.meta.get("other_bytes", 0))
        self.other_footprint = int(table.meta.get("other_footprint_bytes", 0))
        frame = linear.drop_duplicates("name").set_index("name")[["group", "bytes_16bit", "quantizable"]].copy()
        for tier in self.tiers:
            rows = linear[linear["format"] == tier].set_index("name")
            frame[f"supported:{tier}"] = rows["supported"] & frame["quantizable"]
            frame[f"bytes:{tier}"] = rows["bytes"]
            frame[f"footprint:{tier}"] = rows["footprint_bytes"]
        self.frame = frame

    def size(self, choices: Mapping[str, str]) -> Size:
        """The bytes of ``choices`` (``{module: KEEP or tier}``; a Linear it does not name stays 16-bit)."""
        labels = pd.Series(dict(choices), dtype=object).reindex(self.frame.index).fillna(KEEP)
        if unknown := sorted(set(labels) - {KEEP, *self.tiers}):
            raise ValueError(f"choices use {unknown}, which this byte model was not built for: plan with --tiers "
                             f"{','.join([*self.tiers, *unknown])}")
        size = self.frame["bytes_16bit"].astype("int64").copy()
        footprint = size.copy()
        for tier in self.tiers:
            chosen = labels == tier
            size[chosen] = self.frame.loc[chosen, f"bytes:{tier}"].astype("int64")
            footprint[chosen] = self.frame.loc[chosen, f"footprint:{tier}"].astype("int64")
        return Size(self.other + int(size.sum()), self.other_footprint + int(footprint.sum()))

    def all_4bit_mask(self, tier: str) -> pd.Series:
        """The Linears a plain bitsandbytes load puts in ``tier``: every supported one but lm_head."""
        return self.frame[f"supported:{tier}"] & (self.frame["group"] != "lm_head")

    def all_4bit(self, tier: str) -> dict[str, str]:
        """The choices of the plain bitsandbytes load (see :meth:`all_4bit_mask`)."""
        mask = self.all_4bit_mask(tier)
        return {name: tier if four else KEEP for name, four in mask.items()}

    def all_4bit_size(self, tier: str) -> Size:
        """What the plain bitsandbytes load weighs: the floor relative budgets (``+10%``) count from."""
        return self.size(self.all_4bit(tier))

    def sixteen_bit_size(self) -> Size:
        """What the unquantized model weighs: the ceiling of every budget."""
        return self.size({})
