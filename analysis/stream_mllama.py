"""Mllama (Llama 3.2 Vision) streamed: its vision tower's stages, and how batches enter and leave them.

The tower (``model.vision_model``) runs: the stem (patch embedding, class token, pre-tile and
gated position embeddings, pre-norm) -> the local blocks (``transformer.layers``; the outputs of
the ``intermediate_layers_indices`` ones are kept) -> the bridge (post-norm, post-tile
embedding) -> the gated global blocks (``global_transformer.layers``) -> the last global output
with the kept intermediate outputs concatenated to it, which the projector (the splice stage)
turns into the decoder's ``cross_attention_states``.

Each stage sees what it sees in memory: every capture runs the tower's own forward with the
blocks that are not this stage's replaced (:func:`analysis.stream_vision.forwards`):

- the stem (:func:`capture_local_inputs`): the local blocks record what they are called with;
- the bridge (:func:`capture_global_inputs`): the local blocks pass their input on and the last
  returns the stored last local output; the global blocks record;
- the splice (:func:`replayed_tower`, under :func:`analysis.stream_vision.capture_language_inputs`):
  the kept local blocks return their stored outputs, the global blocks pass on and the last
  returns the stored last global output, so the padding removal, the concatenation and the
  projector run as in memory.

A kept local block's output travels beside the hidden states under a carried name
(:func:`kept_name`) to the splice; in the reverse pass its gradient travels back the same way
and is added to the gradient of that block's output (:mod:`analysis.stream_steps`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .stream_stages import CARRY_MARK, Stage, StageKind, layout_of
from .stream_vision import forwards, passing, record_blocks, returning
from .stream_weights import StreamingUnsupported

#: the tower's modules the stem runs, in front of the local blocks
STEM = ("patch_embedding", "class_embedding", "gated_positional_embedding", "pre_tile_positional_embedding",
        "layernorm_pre")
#: the tower's modules the bridge runs, between the local and the global blocks
BRIDGE = ("layernorm_post", "post_tile_positional_embedding")


def tower(model: nn.Module) -> nn.Module:
    """The vision model (``model.vision_model``)."""
    return model.get_submodule(layout_of(model).vision)


def kept_name(index: int) -> str:
    """The carried name of local block ``index``'s output, which the tower concatenates to its own."""
    return f"{CARRY_MARK}local.{index}"


def mllama_vision_stages(model: nn.Module, prefix: str, names: list[str]) -> list[Stage]:
    """The stem, each local block, the bridge and each global block, in the order the data flows."""
    vision = model.get_submodule(prefix)
    kept = set(vision.intermediate_layers_indices)

    def owned(*parts: str) -> list[str]:
        return [n for n in names if any(n.startswith(f"{prefix}.{part}.") or n == f"{prefix}.{part}" for part in parts)]

    local, global_ = vision.transformer.layers, vision.global_transformer.layers
    stages = [Stage("vision stem", StageKind.VISION_STEM, owned(*STEM))]
    stages += [Stage(f"vision local block {i}", StageKind.VISION, owned(f"transformer.layers.{i}"), local[i], index=i,
                     emits=kept_name(i) if i in kept else None) for i in range(len(local))]
    stages.append(Stage("vision bridge", StageKind.VISION_BRIDGE, owned(*BRIDGE)))
    stages += [Stage(f"vision global block {i}", StageKind.VISION, owned(f"global_transformer.layers.{i}"),
                     global_[i], index=i) for i in range(len(global_))]
    for before, after in zip(stages, stages[1:], strict=False):  # the next stage takes what one emits
        after.joins = before.emits
    left = {n for n in names if n.startswith(prefix + ".")} - {n for s in stages for n in s.params}
    if left:  # a tower this layout does not describe: refuse rather than run a module nowhere
        raise StreamingUnsupported(f"streaming analysis does not know where Mllama's {sorted(left)[0]} runs: "
                                   f"run without --max-memory")
    return stages


def _run_tower(model: nn.Module, batch: dict):
    """The model's own call of its vision model on one batch's images."""
    return lambda: tower(model)(pixel_values=batch["pixel_values"], aspect_ratio_ids=batch["aspect_ratio_ids"],
                                aspect_ratio_mask=batch["aspect_ratio_mask"])


def capture_local_inputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The stem's step: (input of the first local block, every local block's keyword arguments)."""
    return record_blocks(tower(model).transformer.layers, _run_tower(model, batch))


def capture_global_inputs(model: nn.Module, batch: dict, replay: torch.Tensor,
                          kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The bridge's step: (input of the first global block, every global block's keyword arguments and the
    carried values of ``kwargs``), the last local block's output ``replay`` read from disk."""
    local = tower(model).transformer.layers
    with forwards(local, [passing] * (len(local) - 1) + [returning(replay, "local block output")]):
        hidden, captured = record_blocks(tower(model).global_transformer.layers, _run_tower(model, batch))
    return hidden, {**captured, **{k: v for k, v in kwargs.items() if k.startswith(CARRY_MARK)}}


@contextmanager
def replayed_tower(model: nn.Module, replay: torch.Tensor, carried: dict):
    """Within the block the tower's forward runs no block: the kept local blocks return their ``carried``
    outputs, the others pass their input on, and the last global block returns ``replay``."""
    vision = tower(model)
    local, global_ = vision.transformer.layers, vision.global_transformer.layers
    kept = set(vision.intermediate_layers_indices)
    missing = [i for i in kept if kept_name(i) not in carried]
    if missing:
        raise RuntimeError(f"the stored vision outputs lack local block {missing[0]}'s: the partial results belong "
                           f"to another run")
    stand_ins = [returning(carried[kept_name(i)], "local block output") if i in kept else passing
                 for i in range(len(local))]
    with forwards(local, stand_ins), forwards(global_, [passing] * (len(global_) - 1) + [returning(replay)]):
        yield
