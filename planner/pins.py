"""--keep / --quantize patterns: which modules a user pins, and a helpful error when none match.

A pattern matches a module's full name when it is a glob over the whole name
(``*.mlp.down_proj``, ``model.layers.0.*``), the exact name, or a dotted prefix or suffix of it
(``model.layers.0`` catches layer 0 only; ``lm_head`` catches ``lm_head``).
"""

from __future__ import annotations

import difflib
import fnmatch


class PatternError(ValueError):
    """A pin pattern that matches no module."""


def matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` names ``name`` (glob, exact, dotted prefix or dotted suffix)."""
    return (fnmatch.fnmatchcase(name, pattern) or name == pattern
            or name.startswith(pattern + ".") or name.endswith("." + pattern))


def match_patterns(patterns, names, flag: str) -> dict[str, str]:
    """``{module: pattern}`` for every module a pattern hits; an error for a pattern that hits none."""
    names = list(names)
    hit: dict[str, str] = {}
    for pattern in patterns or []:
        found = [n for n in names if matches(pattern, n)]
        if not found:
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3)
            raise PatternError(
                f"{flag} {pattern!r} matches no module; nearest names: {near or names[:3]}. "
                "Use a full name, a dotted prefix/suffix, or a glob like '*.mlp.down_proj'"
            )
        for n in found:
            hit.setdefault(n, pattern)
    return hit
