"""Which modules of a model are candidates, and what each one is (group, layer, type).

bitsandbytes (through transformers) replaces ``nn.Linear`` layers only. Every Linear becomes
a row; other modules that hold a matrix (embeddings, convolutions) are listed too, marked not
quantizable with the reason, so nothing disappears from the table silently. Matrices held as bare
parameters (transformers 5's fused MoE experts, a projection kept as a parameter) are no module's
weight: :func:`bare_matrices` names them for the table's metadata, and a warning says so where they hold a
large share of the model (every plan, all-4-bit included, keeps them 16-bit).
"""

from __future__ import annotations

import math
import re
import warnings
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
    is_linear: bool  # a plain nn.Linear: what transformers' bitsandbytes integration replaces
    linear_subclass: bool = False  # a subclass of nn.Linear (FalconLinear, ...), left in 16-bit by transformers

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
        is_linear = type(module) is nn.Linear  # transformers' own test: a subclass is left in 16-bit
        out_features, in_features = weight.shape[0], math.prod(weight.shape[1:])
        infos.append(
            ModuleInfo(
                name=name,
                group=module_group(name, lm_head),
                layer=layer_index(name),
                module_type=name.rsplit(".", 1)[-1],
                kind=_kind(module, is_linear),
                out_features=out_features,
                in_features=in_features,
                is_linear=is_linear,
                linear_subclass=isinstance(module, nn.Linear) and not is_linear,
            )
        )
    return _number_stacks(infos)


def _kind(module: nn.Module, is_linear: bool) -> str:
    """The class name; a subclass of nn.Linear that is itself named ``Linear`` (remote code) gets its module's name
    in front, since "Linear" in the table means a plain nn.Linear (the planner's byte count reads it)."""
    name = type(module).__name__
    if name == "Linear" and not is_linear:
        return f"{type(module).__module__.rsplit('.', 1)[-1]}.{name}"
    return name


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
    if info.kind == "Conv1D":
        return ("a GPT-2-style Conv1D (weight stored transposed): transformers quantizes it, quantplan does not "
                "measure it yet")
    if info.linear_subclass:
        return (f"{info.kind}, a subclass of nn.Linear: transformers' bitsandbytes integration replaces only "
                "plain nn.Linear layers, so it stays 16-bit")
    if not info.is_linear:
        return f"not a Linear ({info.kind}): bitsandbytes replaces only nn.Linear layers"
    reasons = [f.unsupported_reason(info.shape) for f in formats]
    if all(reasons):
        return reasons[0]
    return None


class NothingToQuantize(ValueError):
    """The model has no module bitsandbytes can quantize besides its output head: there is nothing to plan."""


def check_something_to_quantize(infos: list[ModuleInfo], reasons: dict[str, str | None], lm_head: str | None) -> None:
    """Refuse, before any pass over the calibration data, a model where nothing but the head could be 4-bit
    (Falcon's FalconLinear, GPT-2's Conv1D): its plan would be the 16-bit model. The error counts the reasons."""
    if any(reasons[i.name] is None and i.name != lm_head for i in infos):
        return
    counts: dict[str, int] = {}
    for info in infos:
        if info.name != lm_head and reasons[info.name]:
            counts[reasons[info.name]] = counts.get(reasons[info.name], 0) + 1
    reason, count = max(counts.items(), key=lambda kv: kv[1], default=("it holds no weight matrix", 0))
    raise NothingToQuantize(f"nothing in this model can be quantized to 4-bit besides its output head ({count} "
                            f"module(s): {reason})")


def refuse_quantized(model: nn.Module) -> None:
    """Refuse a model loaded already quantized (a bitsandbytes checkpoint, an export): its Linears are packed, and
    the analysis measures rounding a 16-bit weight."""
    config = getattr(model, "config", None)
    if getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None) is not None:
        raise ValueError("this model is already quantized (its config holds a quantization_config): pass the 16-bit "
                         "model it was made from")


#: share of the model's parameter bytes in bare matrices above which the analysis warns
BARE_SHARE_WARNING = 0.25


def bare_matrices(model: nn.Module, infos: list[ModuleInfo]) -> dict[str, list[int]]:
    """Parameters of two or more dimensions that are no listed module's ``weight`` (name -> shape): bitsandbytes
    cannot replace them, so they stay 16-bit in every plan (counted with the rest of the 16-bit bytes)."""
    modules = dict(model.named_modules())
    listed = {id(modules[i.name].weight) for i in infos}
    seen, bare = set(), {}
    for name, param in model.named_parameters():
        if param.dim() >= 2 and id(param) not in listed and id(param) not in seen:
            seen.add(id(param))
            bare[name] = list(param.shape)
    return bare


def warn_bare_matrices(model: nn.Module, infos: list[ModuleInfo]) -> None:
    """Warn, before any pass, where bare matrices (:func:`bare_matrices`) hold a large share of the model's bytes:
    a 4-bit checkpoint then saves little, and no budget changes it."""
    bare = bare_matrices(model, infos)
    total = sum(p.numel() for p in model.parameters())
    held = sum(math.prod(shape) for shape in bare.values())
    if total and held / total >= BARE_SHARE_WARNING:
        names = ", ".join(list(bare)[:2]) + (", ..." if len(bare) > 2 else "")
        warnings.warn(f"{held / total:.0%} of this model's parameters are in {len(bare)} matrices no Linear holds "
                      f"({names}; e.g. fused MoE experts): transformers' bitsandbytes 4-bit leaves them 16-bit, so "
                      "every plan, all-4-bit included, keeps them 16-bit", stacklevel=2)
