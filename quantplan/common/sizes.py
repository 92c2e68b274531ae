"""Byte sizes as users write them (``1.8GB``, ``1500MiB``, ``123456``): one reading for budgets and memory caps,
and one writing for messages and reports.

GB/MB/kB are decimal (1e9/1e6/1e3), GiB/MiB/KiB binary (2**30/2**20/2**10), as storage vendors
and ``ls -h`` respectively use them; a bare number is bytes.
"""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def read_size(text: str) -> float | None:
    """The byte count ``text`` writes (not rounded), or None when it is not a size.

    For callers that try several forms and word their own error (budgets: ``+10%``, ``0.45x``).
    """
    m = _SIZE.match(str(text))
    if not m:
        return None
    return float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def parse_size(spec: str | int | float) -> int:
    """Bytes for ``2GB`` / ``1500MiB`` / ``123456``; one clear error naming the accepted forms otherwise."""
    if isinstance(spec, int | float):
        return int(spec)
    size = read_size(spec)
    if size is None:
        raise ValueError(f"cannot read memory size {spec!r}: write e.g. 2GB, 1500MiB or a byte count")
    return int(size)


def format_bytes(n: float) -> str:
    """Human-readable bytes (MB/GB, decimal) for messages and reports."""
    if n >= 10**9:
        return f"{n / 10**9:.3f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.2f} MB"
    return f"{n / 10**3:.1f} kB"


def cap_above(need: float) -> str:
    """A ``--max-memory`` value just above ``need`` bytes, as a user types it (``1.27GB``, ``115MB``): what a refusal
    of a cap too small names as the fix."""
    if need >= 10**9:
        return f"{math.floor(need / 10**7) / 100 + 0.01:.2f}GB"
    return f"{math.floor(need / 10**6) + 1}MB"
