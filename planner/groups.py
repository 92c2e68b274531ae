"""Modules that must share a format because inference engines fuse them.

vLLM fuses q/k/v into one ``qkv_proj``, gate/up into one ``gate_up_proj`` and, in DeepSeek's multi-head
latent attention, ``q_a_proj``/``kv_a_proj_with_mqa`` into one ``fused_qkv_a_proj``; a checkpoint that
keeps only some of a fused set in 16-bit fails to load there. With ``--vllm-safe`` the planner
decides each fused set as one item; with ``--whole-blocks`` every transformer block (all
Linears under ``...layers.N.``) shares one format, for engines that cannot mix inside a block.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|blocks|block|h)\.\d+)\.")

FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"}, {"q_a_proj", "kv_a_proj_with_mqa"})


def fused_groups(names: list[str], whole_blocks: bool = False) -> list[list[str]]:
    """Partition ``names`` into fused sets (same parent, member of one FUSED set) and singletons,
    or into whole blocks (modules outside any block stay singletons)."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        block = _BLOCK.match(name) if whole_blocks else None
        if block:
            groups.setdefault((block.group(1), "block"), []).append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        fused = next((i for i, s in enumerate(FUSED) if leaf in s), None)
        key = (parent, fused) if fused is not None else (name, None)
        groups.setdefault(key, []).append(name)
    return list(groups.values())
