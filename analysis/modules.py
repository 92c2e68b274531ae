"""Which modules of a model are candidates, and what each one is (group, layer, type).

bitsandbytes (through transformers) replaces ``nn.Linear`` layers only. Every Linear becomes
a row; other modules that hold a matrix (embeddings, convolutions) are listed too, marked not
quantizable with the reason, so nothing disappears from the table silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from torch import nn

GROUPS = ("language_model", "vision_tower", "projector", "cross_attention", "lm_head")

_PROJECTOR = re.compile(r"(multi_modal_projector|mm_projector|merger|connector|\bprojector\b)")
_VISION = re.compile(r"(visual|vision_tower|vision_model|vision_encoder|image_encoder|vision)")
_CROSS = re.compile(r"cross_attn|cross_attention|crossattention")
_LAYER = re.compile(r"\.(?:layers|layer|blocks|block|h|resblocks)\.(\d+)(?:\.|$)")
_STACK = re.compile(r"^(.*\.(?:layers|layer|blocks|block|h|resblocks))\.\d+(?:\.|$)")


@dataclass(frozen=True)
class ModuleInfo:
    """Identity of one module in the live module tree."""

    name: str  # full dotted name, as model.named_modules() gives it
    group: str  # one of GROUPS
    layer: int  # block index inside its tower, -1 when outside any block
    module_type: str  # last name component: q_proj, down_proj, fc1, ...
    kind: str  # class name (Linear, Embedding, Conv2d, ...)
    out_features: int
    in_features: int
    is_linear: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def list_modules(model: nn.Module) -> list[ModuleInfo]:
    """All Linear layers plus other matrix-holding modules, in module-tree order."""
    lm_head = output_embedding_name(model)
    infos = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        if any(isinstance(child, nn.Module) and child is not module for child in module.children()):
            continue
        is_linear = isinstance(module, nn.Linear)
        out_features, in_features = weight.shape[0], math.prod(weight.shape[1:])
        infos.append(
            ModuleInfo(
                name=name,
                group=module_group(name, lm_head),
                layer=layer_index(name),
                module_type=name.rsplit(".", 1)[-1],
                kind=type(module).__name__,
                out_features=out_features,
                in_features=in_features,
                is_linear=is_linear,
            )
        )
    return _number_stacks(infos)


def output_embedding_name(model: nn.Module) -> str | None:
    """Full name of the output projection (lm_head), if the model has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def module_group(name: str, lm_head: str | None = None) -> str:
    """Which part of the model a module belongs to (see GROUPS)."""
    if name == lm_head or name.endswith("lm_head"):
        return "lm_head"
    if _PROJECTOR.search(name):
        return "projector"
    if _CROSS.search(name):
        return "cross_attention"
    if _VISION.search(name):
        return "vision_tower"
    return "language_model"


def layer_index(name: str) -> int:
    """The block index in a dotted name (``model.layers.7.mlp.up_proj`` -> 7), -1 if none."""
    found = _LAYER.findall("." + name)
    return int(found[-1]) if found else -1


def _number_stacks(infos: list[ModuleInfo]) -> list[ModuleInfo]:
    """Continue the block numbering across the stacks of one group, in module-tree order.

    Mllama's vision tower runs ``transformer.layers.0..31`` and then
    ``global_transformer.layers.0..7``: the global blocks become layers 32..39, so a tower's
    layer index names one block and per-tower plots do not stack two blocks on one x.
    """
    sizes: dict[tuple[str, str], int] = {}
    for info in infos:
        stack = _STACK.match("." + info.name)
        if stack and info.layer >= 0:
            key = (info.group, stack.group(1))
            sizes[key] = max(sizes.get(key, 0), info.layer + 1)
    offsets, running = {}, {}
    for (group, stack), size in sizes.items():
        offsets[(group, stack)] = running.get(group, 0)
        running[group] = running.get(group, 0) + size
    out = []
    for info in infos:
        stack = _STACK.match("." + info.name)
        offset = offsets.get((info.group, stack.group(1)), 0) if stack and info.layer >= 0 else 0
        out.append(replace(info, layer=info.layer + offset) if offset else info)
    return out


def not_quantizable_reason(info: ModuleInfo, formats) -> str | None:
    """Why no candidate format can hold this module (None if at least one can)."""
    if not info.is_linear:
        return f"not a Linear ({info.kind}): bitsandbytes replaces only nn.Linear layers"
    reasons = [f.unsupported_reason(info.shape) for f in formats]
    if all(reasons):
        return reasons[0]
    return None
