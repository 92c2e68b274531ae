"""Module names as the checkpoint saves them, next to the live names transformers 5 builds.

transformers 5 renames a vision-language model's modules when it loads a checkpoint
(``model.language_model.layers.0…`` live, ``model.layers.0…`` or ``language_model.model.layers.0…``
in the file) and reverts the renaming when it saves (``core_model_loading.revert_weight_conversion``).
vLLM reads the saved names and matches ``llm_int8_skip_modules`` entries as substrings of its own
module names, which contain them; so a skip list for vLLM is written in the saved names. We ask
transformers' own reversal for the saved name of one module per top-level part and keep the prefix
renamings (a handful per model, none for a text-only one), checked against the reversal of all names.
"""

from __future__ import annotations

import torch


def checkpoint_prefixes(model, names: list[str]) -> list[list[str]]:
    """``[[live_prefix, saved_prefix], ...]`` renamings that turn ``names`` into the names the checkpoint saves."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the live names are the saved names
        return []

    def saved(batch):
        return {k.removesuffix(".weight") for k in revert_weight_conversion(model, {f"{n}.weight": torch.empty(0)
                                                                                    for n in batch})}

    pairs = {}
    for name in {".".join(n.split(".")[:2]): n for n in names}.values():  # one module per top-level part
        stored = next(iter(saved([name])))
        live, kept = _strip_common_suffix(name, stored)
        if live != kept:
            pairs[live] = kept
    pairs = sorted(([k, v] for k, v in pairs.items()), key=lambda p: -len(p[0]))
    if {to_checkpoint_name(n, pairs) for n in names} != saved(names):
        return []  # not a plain prefix renaming: report the live names only
    return pairs


def to_checkpoint_name(name: str, prefixes: list[list[str]]) -> str:
    """``name`` renamed by the first matching ``[live_prefix, saved_prefix]`` pair (longest first)."""
    for live, stored in prefixes:
        if name.startswith(live):
            return stored + name[len(live):]
    return name


def _strip_common_suffix(live: str, stored: str) -> tuple[str, str]:
    """The differing leading parts of two dotted names, each ending in a dot (``"model.visual."``, ``"visual."``)."""
    a, b = live.split("."), stored.split(".")
    while a and b and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    return "".join(p + "." for p in a), "".join(p + "." for p in b)
