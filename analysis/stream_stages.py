"""The stages of a streamed analysis: which parameters each loads and which modules it measures.

A decoder LLM (``model.model.layers`` + ``model.model.norm`` + ``lm_head``: Llama, SmolLM2,
Qwen2, Mistral ...) streams as embeddings, each decoder layer, then final norm + lm_head.

A vision-language model whose vision tower is a stack of blocks (``model.model.visual.blocks``:
Qwen2-VL, Qwen2.5-VL; ``model.model.vision_tower``'s ``encoder.layers`` or ``transformer.layers``:
LLaVA with a CLIP or a Pixtral tower, whose projector reads the hidden states its
``vision_feature_layer`` names (:mod:`analysis.stream_features`);
``model.model.vision_model.encoder.layers``: Idefics3, SmolVLM) and whose language model is such a
decoder (``model.model.language_model``, Idefics3's ``model.model.text_model``) streams as:

1. the vision stem: the tower's modules registered before its blocks (the patch embedding),
   run up to the first vision block (:mod:`analysis.stream_vision`);
2. each vision block;
3. the splice: the tower's modules registered after its blocks (the merger/projector) and the
   token embeddings; the model's own forward runs from the images and token ids to the first
   decoder layer with the last vision block's output replayed from disk, so the image features
   are spliced into the token embeddings (and the 3D rotary positions made) exactly as the
   model does it (a LLaVA tower's other blocks whose outputs the projector reads return theirs,
   carried beside the hidden states). It borrows the stem's weights (the forward runs the patch
   embedding, whose output the replay replaces); the stem measures them;
4. each decoder layer, then final norm + lm_head, as for an LLM.

Mllama (Llama 3.2 Vision) has two stacks of vision blocks and a cross-attention language model:
the stem, each local block, the bridge between the stacks, each global block, the splice (the
projector and the token embeddings: the projected image features reach the decoder layers as
their ``cross_attention_states`` keyword argument, not among the token embeddings), then the
decoder layers, cross-attention layers included (:mod:`analysis.stream_mllama`). Values a later
stage needs beside the hidden states (the local blocks' intermediate outputs the tower
concatenates to its output) travel with them under a name marked :data:`CARRY_MARK`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from torch import nn

from .stream_weights import StreamingUnsupported

#: marks the name of a value carried beside the hidden states from the stage that makes it to the one that
#: uses it (never a block's keyword argument); in the reverse pass its gradient travels back under the same name
CARRY_MARK = "~"


class Tower(StrEnum):
    """How a vision-language model's vision tower is laid out."""

    BLOCKS = "blocks"  # one stack of blocks (``visual.blocks``: Qwen2-VL, Qwen2.5-VL; LLaVA's vision_tower)
    MLLAMA = "mllama"  # local blocks, a bridge, gated global blocks (``vision_model``: Llama 3.2 Vision)


class StageKind(StrEnum):
    """What a stage runs (each kind has its own forward and backward in :mod:`analysis.stream_steps`)."""

    EMBED = "embed"  # token embeddings up to the first decoder layer (LLMs)
    VISION_STEM = "vision stem"  # images up to the first vision block
    VISION = "vision block"  # one block of the vision tower
    VISION_BRIDGE = "vision bridge"  # between two stacks of vision blocks (Mllama: post norm + post-tile embedding)
    SPLICE = "splice"  # projector + token embeddings, image features spliced in, up to the first decoder layer
    LAYER = "layer"  # one decoder layer
    HEAD = "head"  # final norm + lm_head


#: the stages that run the vision tower's activations
VISION_KINDS = (StageKind.VISION_STEM, StageKind.VISION, StageKind.VISION_BRIDGE)


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
    grad_kwargs: tuple[str, ...] = ()  # keyword arguments whose loss gradient it adds to the ones carried back
    emits: str | None = None  # its output also goes on under this carried name (CARRY_MARK)
    joins: str | None = None  # its input also went on under this carried name (the stage before emits it)

    @property
    def resident(self) -> list[str]:
        """Every parameter loaded while the stage runs."""
        return self.params + self.borrowed


@dataclass(frozen=True)
class Layout:
    """Where a model's streamed parts live (dotted module paths)."""

    language: str  # the module holding ``layers`` and ``norm``
    vision: str | None = None  # the vision tower (None: a text-only model)
    tower: Tower | None = None  # how the vision tower is laid out
    blocks: str = "blocks"  # where a BLOCKS tower keeps its blocks, below ``vision``
    features: tuple[int, ...] | None = None  # the tower's hidden states the projector reads (None: its output)


#: the vision-language models streaming knows, as the refusals name them
STREAMED_VLMS = "Qwen2-VL, Qwen2.5-VL, Mllama (Llama 3.2 Vision), LLaVA (CLIP or Pixtral tower), Idefics3 and SmolVLM"


def layout_of(model: nn.Module) -> Layout:
    """The model's layout, or :class:`StreamingUnsupported` naming the fix."""
    base = getattr(model, "model", None)
    if _is_decoder(base):
        return Layout("model")
    language = getattr(base, "language_model", None)
    tower = getattr(base, "visual", None)
    if _is_decoder(language) and isinstance(getattr(tower, "blocks", None), nn.ModuleList) and hasattr(
            base, "get_image_features"):
        return Layout("model.language_model", "model.visual", Tower.BLOCKS)
    llava = _llava_blocks(base)
    if _is_decoder(language) and llava:
        from .stream_features import feature_layers

        features = feature_layers(base.config, len(_get(base.vision_tower, llava)))
        return Layout("model.language_model", "model.vision_tower", Tower.BLOCKS, llava, features)
    text = getattr(base, "text_model", None)
    if _is_decoder(text) and isinstance(_get(base, "vision_model.encoder.layers"), nn.ModuleList) and hasattr(
            base, "connector") and hasattr(base, "get_image_features"):  # Idefics3, SmolVLM
        return Layout("model.text_model", "model.vision_model", Tower.BLOCKS, "encoder.layers")
    mllama = getattr(base, "vision_model", None)
    if _is_decoder(language) and all(isinstance(getattr(getattr(mllama, stack, None), "layers", None), nn.ModuleList)
                                     for stack in ("transformer", "global_transformer")) and hasattr(
            base, "multi_modal_projector"):
        return Layout("model.language_model", "model.vision_model", Tower.MLLAMA)
    if _is_decoder(language):
        raise StreamingUnsupported(
            f"streaming analysis handles the vision towers of {STREAMED_VLMS}, not {type(model).__name__}'s: run "
            f"without --max-memory")
    raise StreamingUnsupported(
        f"streaming analysis handles decoder LLMs laid out as model.layers + model.norm + lm_head "
        f"(Llama, Qwen2, Mistral, ...) and the vision-language models {STREAMED_VLMS}, not {type(model).__name__}: "
        f"run without --max-memory")


def _llava_blocks(base) -> str | None:
    """Where a LLaVA-style vision tower keeps its blocks (CLIP/SigLIP: ``encoder.layers``, Pixtral:
    ``transformer.layers``), if ``base`` is one."""
    tower = getattr(base, "vision_tower", None)
    if tower is None or not hasattr(base, "get_image_features") or not hasattr(base, "multi_modal_projector"):
        return None
    return next((p for p in ("encoder.layers", "transformer.layers") if isinstance(_get(tower, p), nn.ModuleList)),
                None)


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def _is_decoder(module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "norm")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers."""
    return model.get_submodule(layout_of(model).language).layers


def final_norm(model: nn.Module) -> nn.Module:
    """The language model's final norm (lm_head's input is its output)."""
    return model.get_submodule(layout_of(model).language).norm


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The vision tower's blocks (a tower that is one stack of blocks: Tower.BLOCKS)."""
    layout = layout_of(model)
    return model.get_submodule(f"{layout.vision}.{layout.blocks}")


def stages_of(model: nn.Module, infos, lm_head: str | None, text_only: bool = False) -> list[Stage]:
    """The model's stages in the order the data flows through them (module docstring). ``text_only``: a
    vision-language model's stages for batches without images (the held-out text of the scoreboard): the
    language model alone, as its forward runs without pixel values (no tower, no cross-attention layer)."""
    layout = layout_of(model)
    if text_only:
        layout = replace(layout, vision=None, tower=None)
    if layout.vision and hasattr(model.get_submodule(layout.vision), "deepstack_merger_list"):
        raise StreamingUnsupported(  # the layout's other readers (the in-memory shared prefix) take Qwen3-VL
            f"streaming analysis handles the vision towers of {STREAMED_VLMS}, not {type(model).__name__}'s (its "
            "deepstack mergers run between the tower's blocks and feed the first text layers): run without "
            "--max-memory")
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
    if layout.tower is Tower.MLLAMA:
        from .stream_mllama import mllama_vision_stages

        stages += mllama_vision_stages(model, layout.vision, names)
    elif layout.vision:
        stages += _vision_stages(model, layout, names)
    taken |= {n for s in stages for n in s.params}
    first = [n for n in names if n not in taken]
    if layout.vision:  # the splice runs the tower's own forward: it loads the stem and the bridge too
        run = [n for s in stages if s.kind in (StageKind.VISION_STEM, StageKind.VISION_BRIDGE) for n in s.params]
        carried = tuple(s.emits for s in stages if s.emits)
        stages.append(Stage("merger + embeddings", StageKind.SPLICE, first, borrowed=run, grad_kwargs=carried))
    else:
        stages.append(_embed_stage(model, layout.language, first, layout_of(model).vision if text_only else None))
    cross = set(getattr(model.config.get_text_config(), "cross_attention_layers", None) or [])
    stages += [Stage(f"layer {i}", StageKind.LAYER, [n for n in names if n.startswith(f"{language}layers.{i}.")],
                     layers[i], grad_kwargs=("cross_attention_states",) if i in cross else ())
               for i in range(len(layers)) if not (text_only and i in cross)]
    stages.append(Stage("norm + lm_head", StageKind.HEAD, head))
    for stage in stages:
        owned = set(stage.params)
        stage.linears = [i.name for i in infos if i.name + ".weight" in owned]
    return stages


def _embed_stage(model: nn.Module, language: str, first: list[str], tower: str | None) -> Stage:
    """The token embeddings' stage (``first``: the parameters before the first decoder layer). For a VLM run on text,
    ``tower`` names its vision tower, whose weights stay on disk, but for the one parameter the forward reads its
    device from (Idefics3's ``self.device``: its first parameter, in the tower)."""
    if tower is None:
        return Stage("embeddings", StageKind.EMBED, first)
    base = language.rpartition(".")[0] or "model"
    device_of = next((f"{base}.{n}" for n, _ in model.get_submodule(base).named_parameters()), None)
    return Stage("embeddings", StageKind.EMBED, [n for n in first if not n.startswith(tower + ".")],
                 borrowed=[device_of] if device_of and device_of.startswith(tower + ".") else [])


def _vision_stages(model: nn.Module, layout: Layout, names: list[str]) -> list[Stage]:
    """The stem and one stage per block; the tower's modules after its blocks join the splice stage."""
    blocks = vision_blocks(model)
    prefix = layout.vision + "."
    in_tower = [n for n in names if n.startswith(prefix)]
    block_prefix = f"{prefix}{layout.blocks}."
    first_block = next((i for i, n in enumerate(in_tower) if n.startswith(block_prefix)), len(in_tower))
    stem = [n for n in in_tower[:first_block] if not n.startswith(block_prefix)]  # registered before the blocks
    stages = [Stage("vision stem", StageKind.VISION_STEM, stem)]
    stages += [Stage(f"vision block {i}", StageKind.VISION, [n for n in in_tower if n.startswith(f"{block_prefix}{i}.")],
                     blocks[i], index=i) for i in range(len(blocks))]
    if layout.features:
        from .stream_features import mark_feature_blocks

        mark_feature_blocks(stages, layout.features)
    return stages


def stage_config(model: nn.Module, stage: Stage):
    """The config whose widths describe ``stage``'s activations (the vision tower's, or the language model's)."""
    config = model.config
    if stage.kind in VISION_KINDS:
        return getattr(config, "vision_config", None) or config
    return config.get_text_config()

