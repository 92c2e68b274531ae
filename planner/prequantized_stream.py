"""write_streamed(): a blocksize-menu plan's pre-quantized checkpoint, written tensor by tensor from disk.

The same checkpoint :func:`planner.prequantized.write_prequantized` saves from a loaded 16-bit
model, without loading it: the model is built on the meta device (:func:`analysis.stream_weights.skeleton`),
which gives the keys ``save_pretrained`` would write (its state dict, tied duplicates removed by
transformers' own ``remove_tied_weights_from_state_dict``, renamed by its own reversal of the
checkpoint conversion, :func:`analysis.stream_weights.saved_names`). Each tensor is then read from the
source's safetensors files (:class:`analysis.stream_weights.DiskWeights`), cast to the compute dtype
as ``from_pretrained(dtype=...)`` casts it, quantized by bitsandbytes at its planned format when the
plan puts its module in 4-bit, and added to the current output shard; a shard is written as soon as
the next tensor would take it past ``max_shard_bytes``. Resident memory is one tensor, its packed
copy and one shard, never the 16-bit model.

A source this cannot read the same way (no safetensors files, or weights transformers converts by
more than a renaming when it saves) raises :class:`StreamingUnsupported` before anything is written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantplan.analysis.equalize import Equalization, scale_tensor
from quantplan.analysis.formats import FourBit
from quantplan.analysis.stream_weights import DiskWeights, StreamingUnsupported, saved_names, skeleton

from .plan_types import Plan
from .prequantized import MenuExportError, menu_formats, menu_quantization_config, planned_weight_keys

#: (weight key, 4-bit format, the values read) -> bitsandbytes' (packed weight, quant state) made before, or None
Reuse = Callable[[str, FourBit, torch.Tensor], "tuple | None"]
#: most tensor bytes one output shard holds (transformers' naming: ``model-00001-of-00003.safetensors``)
MAX_SHARD_BYTES = 10**9
#: smallest shard :func:`shard_bytes_for` picks under a memory cap
MIN_SHARD_BYTES = 2**20


def shard_bytes_for(max_memory: int | None) -> int:
    """The output shard size for a run under ``max_memory`` bytes (None: no cap, :data:`MAX_SHARD_BYTES`).

    The writer holds one shard, and while it fills, glibc's heap may keep several times its tensor
    bytes resident (the small packed tensors kept interleave with the freed 16-bit reads, so the
    heap cannot shrink; measured in benchmarks/README.md, streaming_run section). An eighth of the
    cap bounds the writer whatever the depth; a 1 GB shard held the whole 4-bit model of a
    64-layer Llama, and its heap overhead grew with depth.
    """
    if max_memory is None:
        return MAX_SHARD_BYTES
    return max(MIN_SHARD_BYTES, min(MAX_SHARD_BYTES, max_memory // 8))


def write_streamed(path: str | Path, plan: Plan, folder: Path, compute_dtype: torch.dtype,
                   device: str | torch.device = "cpu", max_shard_bytes: int | None = None,
                   reuse: Reuse | None = None) -> None:
    """Write the model saved in ``path`` as ``plan`` says, pre-quantized, into ``folder`` (config, weights,
    generation config), one tensor in memory at a time; 4-bit modules are quantized on ``device``; output
    shards of at most ``max_shard_bytes`` (default :data:`MAX_SHARD_BYTES`). ``reuse(key, fmt, values)``: the packed
    weight and quant state bitsandbytes made before from exactly these values (a run's analysis), or None."""
    formats = menu_formats(plan)
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise StreamingUnsupported(f"{path} holds no safetensors files (re-save the model with save_pretrained "
                                   "to stream it)")
    model = skeleton(path, compute_dtype)
    weights = DiskWeights(path, model)
    equalization = Equalization.from_dict(plan.equalization)
    planned = {key: formats[tier] for key, tier in planned_weight_keys(plan).items()}
    keys = _saved_keys(model, planned)
    names = _output_names(model, keys, planned)
    buffers = dict(model.named_buffers())
    for key in keys:  # every weight found before anything is written
        if key not in buffers:
            weights.key(key)
    shards = ShardWriter(folder, max_shard_bytes or MAX_SHARD_BYTES)
    for key in keys:
        if key in buffers:
            entries = {key: _buffer(weights, key, buffers[key])}
        else:
            entries = _weight_entries(weights, key, planned.get(key), compute_dtype, device, reuse, equalization)
        shards.add({names[k]: t.detach().to("cpu").contiguous() for k, t in entries.items()})
    shards.close(model.num_parameters())
    _write_configs(model, plan, path, folder, compute_dtype)


def _weight_entries(weights: DiskWeights, key: str, fmt: FourBit | None, dtype: torch.dtype,
                    device: str | torch.device, reuse: Reuse | None = None,
                    equalization: Equalization | None = None) -> dict[str, torch.Tensor]:
    """The tensors saved for one parameter: read, cast and scaled as the plan's ``equalization`` says; in 4-bit
    (``fmt``), bitsandbytes' packed weight quantized on ``device`` (or made before from the same values: ``reuse``)
    and its quant state."""
    equalization = equalization or Equalization()
    if fmt is None:
        return {key: scale_tensor(equalization, key, weights.read(key, dtype))}
    values = scale_tensor(equalization, key, weights.read(key, dtype, device))
    made = reuse(key, fmt, values) if reuse is not None else None
    packed, state = made if made is not None else fmt.quantize(values)
    return {key: packed, **{f"{key}.{part}": t for part, t in state.as_dict(packed=True).items()}}


def _saved_keys(model: nn.Module, planned: dict[str, FourBit]) -> list[str]:
    """The live state-dict keys ``save_pretrained`` writes for the quantized model, in its order: tied
    duplicates and ``_keys_to_ignore_on_save`` left out (a quantized weight is its own tensor, tied to none)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    if missing := sorted(planned.keys() - state.keys()):
        raise MenuExportError(f"the model has no weight {missing[0]}: the plan was made for another module tree "
                              "(re-run analyze on this model)")
    for key in planned:
        state[key] = torch.empty(1)  # its own storage, as the packed tensor will be
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return list(remove_tied_weights_from_state_dict(state, model))


def _output_names(model: nn.Module, keys: list[str], formats: dict[str, FourBit]) -> dict[str, str]:
    """Live key -> saved key of every tensor written, the quant-state entries of each 4-bit weight included."""
    parts = {fmt: _state_parts(fmt) for fmt in set(formats.values())}
    live = []
    for key in keys:
        live.append(key)
        if key in formats:
            live.extend(f"{key}.{part}" for part in parts[formats[key]])
    names = saved_names(model, live)
    if missing := [k for k in live if k not in names]:
        raise StreamingUnsupported(f"transformers converts {missing[0]} by more than a renaming when it saves "
                                   "(e.g. fused MoE experts, saved one tensor per expert)")
    return names


def _state_parts(fmt: FourBit) -> list[str]:
    """The names of the quant-state entries bitsandbytes saves beside a weight quantized in ``fmt``."""
    _, state = fmt.quantize(torch.ones(1, fmt.blocksize))
    return list(state.as_dict(packed=True))


def _buffer(weights: DiskWeights, key: str, default: torch.Tensor) -> torch.Tensor:
    """A persistent buffer as ``from_pretrained`` holds it: the checkpoint's, else the one the model builds."""
    try:
        return weights.read(key, default.dtype)
    except StreamingUnsupported:
        return default


def _write_configs(model: nn.Module, plan: Plan, source: Path, folder: Path, compute_dtype: torch.dtype) -> None:
    """``config.json`` as ``save_pretrained`` writes it for the quantized model, and the generation config."""
    config = model.config
    config.dtype = str(compute_dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.quantization_config = menu_quantization_config(plan, compute_dtype)
    config.save_pretrained(folder)
    generation = source / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / generation.name)
    elif model.can_generate():
        model.generation_config.save_pretrained(folder)


class ShardWriter:
    """Tensors gathered into safetensors shards of at most ``max_bytes`` each (a group of tensors stays in
    one shard), each written as it fills; :meth:`close` names them as ``save_pretrained`` does."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.parts: list[tuple[Path, list[str]]] = []
        self.pending_bytes = self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add one group (a weight and its quant state); write the shard first if the group would overflow it."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total += size

    def close(self, total_parameters: int) -> None:
        """Write the last shard; one shard is ``model.safetensors``, several are numbered with an index."""
        self._flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (part, keys) in enumerate(self.parts, 1):
            name = f"model-{number:05d}-of-{len(self.parts):05d}.safetensors"
            part.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total},
                 "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending and self.parts:
            return
        part = self.folder / f"model.part-{len(self.parts) + 1:05d}.safetensors.tmp"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0
