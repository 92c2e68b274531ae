"""Memory budgets as users write them, resolved to a byte count.

Three forms: absolute (``1.8GB``, ``1700MiB``, ``900MB``, ``123456`` bytes), relative to the
all-4-bit model (``+10%``), or a fraction of the 16-bit model (``0.45x``). GB/MB are decimal
(1e9/1e6), GiB/MiB binary, as storage vendors and ``ls -h`` respectively use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantplan.common.sizes import read_size

_RELATIVE = re.compile(r"^\s*\+\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*$", re.IGNORECASE)


class BudgetError(ValueError):
    """A budget that cannot be parsed or met."""


@dataclass(frozen=True)
class Budget:
    """A parsed budget; :meth:`resolve` turns it into bytes for a given model."""

    spec: str
    kind: str  # absolute | over_4bit | of_16bit
    value: float

    def resolve(self, bytes_all_4bit: int, bytes_16bit: int) -> int:
        """Byte budget for a model whose all-4-bit and all-16-bit sizes are given."""
        if self.kind == "absolute":
            return int(self.value)
        if self.kind == "over_4bit":
            return int(bytes_all_4bit * (1 + self.value / 100))
        return int(bytes_16bit * self.value)


def parse_budget(spec: str | int | float) -> Budget:
    """Parse ``1.8GB`` / ``1700MiB`` / ``+10%`` / ``0.45x``; one clear error otherwise."""
    if isinstance(spec, int | float):
        return Budget(str(spec), "absolute", float(spec))
    text = str(spec)
    if m := _RELATIVE.match(text):
        return Budget(text, "over_4bit", float(m.group(1)))
    if m := _FRACTION.match(text):
        return Budget(text, "of_16bit", float(m.group(1)))
    if (size := read_size(text)) is not None:
        return Budget(text, "absolute", size)
    raise BudgetError(
        f"cannot read budget {text!r}: write an absolute size (1.8GB, 1700MiB), a share over "
        f"all-4-bit (+10%), or a fraction of the 16-bit size (0.45x)"
    )

