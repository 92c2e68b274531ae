"""Which hidden states of a LLaVA-style vision tower its projector reads, streamed.

``LlavaModel.get_image_features`` (and LLaVA-NeXT's, LLaVA-OneVision's, VipLLaVA's, Aya
Vision's ...) runs the whole tower with ``output_hidden_states`` and reads
``hidden_states[vision_feature_layer]``: index 0 is the first block's input, index i block
i - 1's output, -1 the last block's (LLaVA-1.5 reads -2, the block before the last). A list of
indices reads each of those hidden states and concatenates them along the feature dimension;
the select strategy "default" then drops each one's CLS token ("full" keeps it), and the
projector reads the result.

Streamed, every block whose output is read, the last excepted (the splice's own input),
emits it under a carried name (:func:`feature_name`) that travels with the hidden states to the
splice. There the tower's forward runs with stand-in blocks (:func:`feature_stand_ins`): those
blocks return their carried outputs, the others pass their input on, the last returns the
splice's input; the tower's output capture records them as its hidden states, and the model's
own code picks, crops (select strategy) and concatenates them, so nothing here depends on the
strategy or on how the model combines the layers.

In the reverse pass the gradient of each carried output goes back beside the hidden states to
the block after its emitter, which adds it to the gradient of its input (``Stage.joins``), as
autograd sums a tensor's uses in memory. The blocks after the deepest block read feed no loss:
in memory they still run (the tower runs whole), so their input statistics exist, but autograd
never reaches them, so they get no Fisher score. Streamed the same: no gradient reaches the
splice's input, none is stored (:mod:`analysis.stream_store`), and their backward steps run
their forward, measured, and backpropagate nothing but the carried gradients
(:mod:`analysis.stream_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stream_stages import CARRY_MARK, Stage, StageKind
from .stream_vision import passing, returning
from .stream_weights import StreamingUnsupported


def feature_layers(config, blocks: int) -> tuple[int, ...]:
    """The hidden-state indices (0 .. ``blocks``, sorted) ``config.vision_feature_layer`` names (-1 when unset)."""
    layer = getattr(config, "vision_feature_layer", -1)
    layers = [layer] if isinstance(layer, int) else list(layer) if isinstance(layer, Sequence) else None
    count = blocks + 1  # the first block's input, then each block's output
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count for i in layers):
        raise StreamingUnsupported(
            f"vision_feature_layer {layer!r} names no hidden state of this {blocks}-block vision tower (an index "
            f"or a list of indices from {-count} to {blocks}): fix vision_feature_layer in the model's config.json")
    return tuple(sorted({i % count for i in layers}))


def feature_name(index: int) -> str:
    """The carried name of hidden state ``index`` (block ``index - 1``'s output), which the projector reads."""
    return f"{CARRY_MARK}feature.{index}"


def mark_feature_blocks(stages: list[Stage], features: tuple[int, ...]) -> None:
    """Each vision block whose output the projector reads, the last excepted, emits it; the block after joins it."""
    blocks = [s for s in stages if s.kind is StageKind.VISION]
    for index in features:
        if 0 < index < len(blocks):
            blocks[index - 1].emits = feature_name(index)
            blocks[index].joins = feature_name(index)


def feature_stand_ins(blocks: int, replay: torch.Tensor, carried: dict, features: tuple[int, ...]) -> list:
    """The splice's stand-in forwards of the tower's blocks: the read ones return their ``carried`` outputs,
    the last one ``replay``, the others pass their input on."""
    read = [i for i in features if 0 < i < blocks]
    missing = [i for i in read if feature_name(i) not in carried]
    if missing:
        raise RuntimeError(f"the stored vision outputs lack block {missing[0] - 1}'s: the partial results belong "
                           f"to another run")
    stand_ins = [passing] * (blocks - 1) + [returning(replay)]
    for index in read:
        stand_ins[index - 1] = returning(carried[feature_name(index)], "vision block output")
    return stand_ins
