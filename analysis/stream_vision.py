"""How a vision-language model's batches enter and leave its streamed vision tower.

Three captures, each through the model's own forward code so that what the blocks see is
what they see in memory (window reordering, rotary positions, the 3D positions of the
language model, where the image features go among the token embeddings):

- :func:`capture_vision_inputs`: the images through the model's ``get_image_features`` up to
  the vision blocks, which only record what they are called with (no block runs). Blocks may
  be called with different keyword arguments (Qwen2.5-VL: windowed attention in most blocks,
  full attention in a few): block 0's are kept under their own names and every other block's
  that differ under ``name@block`` (:func:`block_kwargs` picks a block's).
- :func:`capture_language_inputs`: the model's forward up to its first decoder layer; with
  ``replay`` (the last vision block's output read from disk) the vision blocks are skipped and
  the last one returns ``replay`` (and a LLaVA tower's blocks whose outputs its projector also
  reads return theirs, carried: :mod:`analysis.stream_features`), so the merger, the splice
  into the token embeddings and the position ids run as in memory on the streamed image
  features. With gradients on, the gradient of the decoder layer's input flows back to
  ``replay`` (and to the carried outputs).

Mllama's tower has two stacks of blocks and a bridge between them; its captures, the same
way through its own forward, are in :mod:`analysis.stream_mllama`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .stream_stages import CARRY_MARK, Tower, decoder_layers, layout_of, vision_blocks
from .stream_weights import StreamingUnsupported

#: separates a keyword argument's name from the vision block it belongs to
BLOCK_MARK = "@"


class _Captured(Exception):
    """Raised once the inputs sought have been seen (the rest of the forward is not needed)."""


def capture_vision_inputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """(input of the first vision block, every block's keyword arguments) for one batch."""
    if batch.get("pixel_values") is None:
        raise StreamingUnsupported(
            f"streaming analysis of {type(model).__name__} calibrates on images, and this batch has none: pass "
            f"--images, or run --text-only without --max-memory")
    if layout_of(model).tower is Tower.MLLAMA:
        from .stream_mllama import capture_local_inputs

        return capture_local_inputs(model, batch)
    base = model.get_submodule(layout_of(model).vision.rpartition(".")[0])
    features = base.get_image_features
    wanted = inspect.signature(features).parameters
    return record_blocks(vision_blocks(model), lambda: features(**{k: v for k, v in batch.items() if k in wanted}))


def record_blocks(blocks: nn.ModuleList, run) -> tuple[torch.Tensor, dict]:
    """(input of ``blocks[0]``, every block's keyword arguments) as ``run()``, the model's own forward, calls them.

    The blocks only record what they are called with and pass their input on; the forward stops
    after the last one.
    """
    calls: list[tuple[torch.Tensor, dict]] = []
    named = list(inspect.signature(type(blocks[0]).forward).parameters)[2:]  # after self, hidden_states

    def record(hidden_states, *args, **kwargs):
        if len(args) > len(named) or any(name in kwargs for name in named[:len(args)]):
            raise TypeError("vision blocks called with positional arguments their forward does not name")
        calls.append((hidden_states, {**dict(zip(named, args, strict=False)), **kwargs}))  # as keyword arguments
        if len(calls) == len(blocks):
            raise _Captured
        return hidden_states

    with forwards(blocks, [record] * len(blocks)):
        try:
            run()
        except _Captured:
            pass
    first = calls[0][1]
    kwargs = dict(first)
    for index, (_, other) in enumerate(calls[1:], start=1):
        kwargs.update({f"{key}{BLOCK_MARK}{index}": value for key, value in other.items()
                       if key not in first or value is not first[key]})
    return calls[0][0], kwargs


def block_kwargs(kwargs: dict, index: int) -> dict:
    """Vision block ``index``'s keyword arguments out of :func:`capture_vision_inputs`' dict (carried values left
    out)."""
    mine = {k: v for k, v in kwargs.items() if BLOCK_MARK not in k and not k.startswith(CARRY_MARK)}
    suffix = f"{BLOCK_MARK}{index}"
    mine.update({k[: -len(suffix)]: v for k, v in kwargs.items() if k.endswith(suffix)})
    return mine


def capture_language_inputs(model: nn.Module, batch: dict, replay: torch.Tensor | None = None,
                            carried: dict | None = None):
    """(hidden states, keyword arguments) the first decoder layer to run receives for one batch.

    ``replay``: the last vision block's output, standing in for the whole vision tower's blocks
    (a vision-language model's splice stage), with the ``carried`` values the tower also uses
    (Mllama's intermediate block outputs); None runs the model's forward as it is.
    """
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    # on every layer: the first that runs (Mllama skips a cross-attention layer 0 given no image features)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    base = model.get_submodule(layout_of(model).language.rpartition(".")[0] or "model")
    try:
        with _replayed(model, replay, carried or {}):
            base(**batch, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured["hidden"], captured["kwargs"]


def passing(hidden_states, *args, **kwargs):
    """A block's stand-in forward that passes its input on."""
    return hidden_states


def returning(value: torch.Tensor, what: str = "vision output"):
    """A block's stand-in forward that returns the stored ``value`` (of the shape of its input)."""
    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape != value.shape:
            raise RuntimeError(f"the stored {what} has shape {tuple(value.shape)}, the tower expects "
                               f"{tuple(hidden_states.shape)}: the partial results belong to other images")
        return value

    return forward


@contextmanager
def _replayed(model: nn.Module, replay: torch.Tensor | None, carried: dict):
    """Within the block, the vision blocks pass their input on and the last returns ``replay`` (the ones whose
    outputs the projector also reads return their ``carried`` outputs)."""
    if replay is None:
        yield
        return
    if layout_of(model).tower is Tower.MLLAMA:
        from .stream_mllama import replayed_tower

        with replayed_tower(model, replay, carried):
            yield
        return
    blocks, features = vision_blocks(model), layout_of(model).features
    stand_ins = [passing] * (len(blocks) - 1) + [returning(replay)]
    if features:  # a LLaVA tower whose projector reads other blocks' outputs too
        from .stream_features import feature_stand_ins

        stand_ins = feature_stand_ins(len(blocks), replay, carried, features)
    with forwards(blocks, stand_ins):
        yield


@contextmanager
def forwards(modules, stand_ins):
    """Give each module another forward for the duration of the block (its hooks and parameters stay)."""
    for module, forward in zip(modules, stand_ins, strict=True):
        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward
