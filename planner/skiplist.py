"""The skip list: the ``llm_int8_skip_modules`` entries that keep exactly the planned modules 16-bit.

transformers 5 matches each entry against a module's full name as an anchored regex with a
module boundary, or as a suffix (``quantizers_utils.should_convert_module``); transformers 4
matched substrings. Full names hit exactly one module under both rules, except where a name
is a prefix or suffix of another candidate's name; we check every entry against every
candidate with transformers' own matcher and refuse a list that would catch anything else.
Giving any skip list turns off transformers' automatic lm_head exclusion, so lm_head is named
explicitly whenever it stays 16-bit.
"""

from __future__ import annotations

import re


class SkipListError(ValueError):
    """A skip list that would hit modules the plan quantizes (or miss ones it keeps)."""


def build_skip_list(kept: list[str], quantized: list[str]) -> list[str]:
    """Skip-list entries for ``kept`` modules, verified not to touch any ``quantized`` one."""
    entries = []
    for name in sorted(kept, key=_natural):
        entries.append(name if not _over_matches(name, quantized) else _anchored(name))
    verify_skip_list(entries, kept, quantized)
    return entries


def verify_skip_list(entries: list[str], kept: list[str], quantized: list[str]) -> None:
    """Check with transformers' matcher that ``entries`` hit every kept module and no quantized one."""
    should_convert = _matcher()
    wrongly_skipped = [n for n in quantized if not should_convert(n, entries)]
    wrongly_converted = [n for n in kept if should_convert(n, entries)]
    if wrongly_skipped or wrongly_converted:
        raise SkipListError(
            "skip list does not match the plan under transformers' matching rules: "
            f"would keep {wrongly_skipped[:5]} 16-bit and quantize {wrongly_converted[:5]}"
        )


def _over_matches(entry: str, quantized: list[str]) -> bool:
    should_convert = _matcher()
    return any(not should_convert(n, [entry]) for n in quantized)


def _anchored(name: str) -> str:
    """A regex entry that matches ``name`` and nothing longer (transformers 5 only)."""
    return "^" + re.escape(name) + "$"


def _matcher():
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers 4: substring rule
        def should_convert_module(full_name, patterns=None):
            return not any(p in full_name for p in patterns or [])
    return should_convert_module


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
