"""Variants of one model that agree on their first decoder layers run those layers once per batch.

:func:`analysis.reference.for_each_variant` runs, per calibration batch, the 16-bit model and each
variant (some Linears round-tripped by :class:`~analysis.simulate.QuantCache`). Two runs that
round-trip the same modules in the same formats outside the decoder layers and in decoder layers
0..k-1 compute the same output of layer k-1, bit for bit, so the later run starts at layer k from
the earlier run's output. A variant that keeps its first layers in 16 bits (the report's one-module
variants, a plan keeping early layers) starts where it first differs from the 16-bit run or from an
earlier variant; a variant identical to an earlier one re-runs only the final norm and lm_head.

How: a forward hook keeps a copy of the earlier run's output of layer k-1 (tokens × hidden, this
batch only), only at the layers where a later run forks, and drops it when the last run forking there
starts: memory holds (distinct fork points still needed) × tokens × hidden; in the later run layers 0..k-1 return that output instead of computing (their
``forward`` is swapped for the replay), and the model's own forward does everything else as always
(embeddings, masks, rotary positions, layers k.., final norm, lm_head). A model whose decoder layers
are not found (:func:`analysis.stream_stages.layout_of`) runs every variant whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Fork:
    """Where a run starts: the first decoder layer it computes, continuing the output of ``parent``'s layer before."""

    parent: int  # index of the earlier run it continues (unused when layer is 0)
    layer: int  # 0: the whole forward


def plan_forks(configs: Sequence[Mapping[str, object]], layer_of: Callable[[str], int | None],
               count: int) -> list[Fork]:
    """Per run (module name -> round-trip format; run 0 first), the earlier run it shares the most layers with.

    Among equally long prefixes the earliest run wins, which always computed the shared layers itself
    (a later run sharing them replayed them from that one), so its recorded output is real.
    """
    keys = [_layer_keys(config, layer_of, count) for config in configs]
    forks = [Fork(0, 0)]
    for i in range(1, len(keys)):
        best = Fork(0, 0)
        for j in range(i):
            shared = _shared_layers(keys[j], keys[i])
            if shared > best.layer:
                best = Fork(j, shared)
        forks.append(best)
    return forks


def _layer_keys(config: Mapping[str, object], layer_of, count: int) -> tuple:
    """(what is round-tripped outside the layers, what in each layer) as comparable values."""
    layers = [set() for _ in range(count)]
    outside = set()
    for name, fmt in config.items():
        index = layer_of(name)
        (outside if index is None or index >= count else layers[index]).add((name, fmt))
    return frozenset(outside), [frozenset(layer) for layer in layers]


def _shared_layers(a: tuple, b: tuple) -> int:
    """How many leading decoder layers two runs compute alike (0 when they differ outside the layers)."""
    if a[0] != b[0]:
        return 0
    shared = 0
    for mine, theirs in zip(a[1], b[1], strict=True):
        if mine != theirs:
            break
        shared += 1
    return shared


class PrefixRuns:
    """The runs of one model over a batch, each started at its :class:`Fork` (module docstring).

    ``configs``: per run, module name -> the format it is round-tripped in (run 0 first, usually the
    16-bit model: ``{}``). Per batch the caller runs them in order, each once, setting each run's
    weights before :meth:`run`; :meth:`new_batch` forgets what the previous batch left.
    """

    def __init__(self, model: nn.Module, configs: Sequence[Mapping[str, object]]):
        self.layers, prefix = decoder_of(model)
        count = len(self.layers) if self.layers is not None else 0
        self.forks = plan_forks(configs, lambda name: _index(name, prefix), count)
        self.keep = {i: sorted({f.layer - 1 for f in self.forks if f.layer and f.parent == i})
                     for i in range(len(self.forks))}
        self.last_use = {(f.parent, f.layer - 1): i for i, f in enumerate(self.forks) if f.layer}  # the last wins
        self.kept: dict[tuple[int, int], object] = {}  # (run, layer) -> its output, while a later run needs it

    def continued(self, index: int) -> bool:
        """Whether a later run starts from run ``index``'s decoder layers (so run ``index`` must run first)."""
        return bool(self.keep[index])

    def new_batch(self) -> None:
        """Forget the outputs recorded on the previous batch."""
        self.kept.clear()

    def run(self, index: int, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``forward()`` (the model's forward on this batch, weights set for run ``index``) from its fork on."""
        fork = self.forks[index]
        replay = self._replay_for(index)
        handles = [self.layers[layer].register_forward_hook(self._keeper(index, layer)) for layer in self.keep[index]]
        try:
            for layer in range(fork.layer):
                self.layers[layer].forward = _Replay(replay)
            return forward()
        finally:
            for handle in handles:
                handle.remove()
            for layer in range(fork.layer):
                del self.layers[layer].forward

    def _replay_for(self, index: int):
        """The output run ``index`` starts from (None at layer 0), dropped from :attr:`kept` if no later run needs it."""
        fork = self.forks[index]
        if not fork.layer:
            return None
        key = (fork.parent, fork.layer - 1)
        if key not in self.kept:
            raise RuntimeError(f"run {index} continues run {fork.parent}'s decoder layer {fork.layer - 1}, which has "
                               "not run on this batch: run the variants in order, each once per batch")
        return self.kept.pop(key) if self.last_use[key] == index else self.kept[key]

    def _keeper(self, index: int, layer: int):
        def keep(module, args, output):
            self.kept[(index, layer)] = _copy(output)
        return keep


class _Replay:
    """A decoder layer's forward that returns an earlier run's output of the fork's previous layer."""

    def __init__(self, output):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


def decoder_of(model: nn.Module) -> tuple[nn.ModuleList | None, str]:
    """The language model's decoder layers and their qualified name (None, "" when the layout is unknown)."""
    from .stream_stages import layout_of
    from .stream_weights import StreamingUnsupported

    try:
        language = layout_of(model).language
    except StreamingUnsupported:
        return None, ""
    return model.get_submodule(language).layers, f"{language}.layers."


def _index(name: str, prefix: str) -> int | None:
    """The decoder layer a module name lies in (None: outside the layers)."""
    if not prefix or not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _copy(output):
    """A copy of a layer's output (a tensor or a tuple of them), safe from later in-place changes."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_copy(o) for o in output)
    return output
