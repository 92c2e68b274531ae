"""The stages of a streamed analysis: which parameters each loads and which modules it measures.

A decoder LLM (``model.model.layers`` + ``model.model.norm`` + ``lm_head``: Llama, SmolLM2,
Qwen2, Mistral ...) streams as embeddings, each decoder layer, then final norm + lm_head.

A vision-language model whose vision tower is a stack of blocks (``model.model.visual.blocks``:
Qwen2-VL, Qwen2.5-VL) and whose language model is such a decoder
(``model.model.language_model``) streams as:

1. the vision stem: the tower's modules registered before its blocks (the patch embedding),
   run up to the first vision block (:mod:`analysis.stream_vision`);
2. each vision block;
3. the splice: the tower's modules registered after its blocks (the merger/projector) and the
   token embeddings; the model's own forward runs from the images and token ids to the first
   decoder layer with the last vision block's output replayed from disk, so the image features
   are spliced into the token embeddings (and the 3D rotary positions made) exactly as the
   model does it. It borrows the stem's weights (the forward runs the patch embedding, whose
   output the replay replaces); the stem measures them;
4. each decoder layer, then final norm + lm_head, as for an LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from torch import nn

from .stream_weights import StreamingUnsupported


class StageKind(StrEnum):
    """What a stage runs (each kind has its own forward and backward in :mod:`analysis.stream_steps`)."""

    EMBED = "embed"  # token embeddings up to the first decoder layer (LLMs)
    VISION_STEM = "vision stem"  # images up to the first vision block
    VISION = "vision block"  # one block of the vision tower
    SPLICE = "splice"  # projector + token embeddings, image features spliced in, up to the first decoder layer
    LAYER = "layer"  # one decoder layer
    HEAD = "head"  # final norm + lm_head


@dataclass
class Stage:
    """One unit of streaming: the parameters it loads and how it runs a batch."""

    label: str
    kind: StageKind
    params: list[str]  # parameters this stage owns (its modules are measured here)
    layer: nn.Module | None = None  # the block a LAYER or VISION stage runs
    linears: list[str] = field(default_factory=list)  # modules measured in this stage
    borrowed: list[str] = field(default_factory=list)  # parameters it also loads, owned by another stage
    index: int = 0  # a VISION stage's block number (its keyword arguments may differ by block)

    @property
    def resident(self) -> list[str]:
        """Every parameter loaded while the stage runs."""
        return self.params + self.borrowed


@dataclass(frozen=True)
class Layout:
    """Where a model's streamed parts live (dotted module paths)."""

    language: str  # the module holding ``layers`` and ``norm``
    vision: str | None = None  # the vision tower holding ``blocks`` (None: a text-only model)


def layout_of(model: nn.Module) -> Layout:
    """The model's layout, or :class:`StreamingUnsupported` naming the fix."""
    base = getattr(model, "model", None)
    if _is_decoder(base):
        return Layout("model")
    language = getattr(base, "language_model", None)
    tower = getattr(base, "visual", None)
    if _is_decoder(language) and isinstance(getattr(tower, "blocks", None), nn.ModuleList) and hasattr(
            base, "get_image_features"):
        return Layout("model.language_model", "model.visual")
    if _is_decoder(language):
        raise StreamingUnsupported(
            f"streaming analysis handles vision towers laid out as a stack of blocks (Qwen2-VL, Qwen2.5-VL), not "
            f"{type(model).__name__}'s: run without --max-memory")
    raise StreamingUnsupported(
        f"streaming analysis handles decoder LLMs laid out as model.layers + model.norm + lm_head "
        f"(Llama, Qwen2, Mistral, ...) and Qwen2-VL-style vision-language models, not {type(model).__name__}: "
        f"run without --max-memory")


def _is_decoder(module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "norm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers."""
    return model.get_submodule(layout_of(model).language).layers


def final_norm(model: nn.Module) -> nn.Module:
    """The language model's final norm (lm_head's input is its output)."""
    return model.get_submodule(layout_of(model).language).norm


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The vision tower's blocks."""
    return model.get_submodule(layout_of(model).vision).blocks


def stages_of(model: nn.Module, infos, lm_head: str | None) -> list[Stage]:
    """The model's stages in the order the data flows through them (module docstring)."""
    layout = layout_of(model)
    if lm_head is None:
        raise StreamingUnsupported(f"streaming analysis needs an lm_head, and {type(model).__name__} has none: "
                                   f"run without --max-memory")
    layer_types = set(getattr(model.config.get_text_config(), "layer_types", None) or [])
    if len(layer_types) > 1:
        raise StreamingUnsupported(
            f"this model mixes attention types across layers ({sorted(layer_types)}), whose masks differ by "
            f"layer; streaming analysis carries one mask: run without --max-memory")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    language, layers = layout.language + ".", decoder_layers(model)
    in_layers = {n for n in names if n.startswith(language + "layers.")}
    head = [n for n in names if n.startswith(language + "norm.") or not n.startswith("model.")]
    stages, taken = [], in_layers | set(head)
    if layout.vision:
        vision = _vision_stages(model, layout.vision, names)
        stages += vision
        taken |= {n for s in vision for n in s.params}
    first = [n for n in names if n not in taken]
    if layout.vision:
        stages.append(Stage("merger + embeddings", StageKind.SPLICE, first, borrowed=list(stages[0].params)))
    else:
        stages.append(Stage("embeddings", StageKind.EMBED, first))
    stages += [Stage(f"layer {i}", StageKind.LAYER, [n for n in names if n.startswith(f"{language}layers.{i}.")],
                     layers[i]) for i in range(len(layers))]
    stages.append(Stage("norm + lm_head", StageKind.HEAD, head))
    for stage in stages:
        owned = set(stage.params)
        stage.linears = [i.name for i in infos if i.name + ".weight" in owned]
    return stages


def _vision_stages(model: nn.Module, tower: str, names: list[str]) -> list[Stage]:
    """The stem and one stage per block; the tower's modules after its blocks join the splice stage."""
    blocks = model.get_submodule(tower).blocks
    prefix = tower + "."
    in_tower = [n for n in names if n.startswith(prefix)]
    block_prefix = prefix + "blocks."
    first_block = next((i for i, n in enumerate(in_tower) if n.startswith(block_prefix)), len(in_tower))
    stem = [n for n in in_tower[:first_block] if not n.startswith(block_prefix)]  # registered before the blocks
    stages = [Stage("vision stem", StageKind.VISION_STEM, stem)]
    stages += [Stage(f"vision block {i}", StageKind.VISION, [n for n in in_tower if n.startswith(f"{block_prefix}{i}.")],
                     blocks[i], index=i) for i in range(len(blocks))]
    return stages


def stage_config(model: nn.Module, stage: Stage):
    """The config whose widths describe ``stage``'s activations (the vision tower's, or the language model's)."""
    config = model.config
    if stage.kind in (StageKind.VISION_STEM, StageKind.VISION):
        return getattr(config, "vision_config", None) or config
    return config.get_text_config()

