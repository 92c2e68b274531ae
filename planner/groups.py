"""Modules that must share a format because inference engines fuse them.

vLLM fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``; a checkpoint that
keeps only some of a fused set in 16-bit fails to load there. With ``--vllm-safe`` the planner
decides each fused set as one item.
"""

from __future__ import annotations

FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})


def fused_groups(names: list[str]) -> list[list[str]]:
    """Partition ``names`` into fused sets (same parent, member of one FUSED set) and singletons."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        fused = next((i for i, s in enumerate(FUSED) if leaf in s), None)
        key = (parent, fused) if fused is not None else (name, None)
        groups.setdefault(key, []).append(name)
    return list(groups.values())
