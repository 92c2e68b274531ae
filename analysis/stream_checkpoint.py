"""A pre-quantized bitsandbytes 4-bit checkpoint run block by block: the exact bytes a plan ships, measured.

The export writes a plan as transformers' pre-quantized bnb-4bit layout (:mod:`planner.prequantized`,
:mod:`planner.prequantized_stream`): each 4-bit Linear's ``weight`` is bitsandbytes' packed uint8 tensor,
followed by its quant state (``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``); every other tensor is 16-bit;
``config.json`` holds the ``quantization_config``. Plain ``from_pretrained`` makes each 4-bit Linear a
``bitsandbytes.nn.Linear4bit`` whose weight is ``Params4bit.from_prequantized(packed, quant state)``
(transformers' ``Bnb4bitDeserialize``), with the config's compute dtype, and keeps the other tensors as
saved: transformers 5 does not cast a pre-quantized checkpoint's 16-bit tensors to ``from_pretrained``'s
``dtype`` (a bf16 export loads in bf16 even with ``dtype=torch.float32``; tests/test_stream_checkpoint.py
compares the two).

Here the same is done one stage at a time on the source's meta-device skeleton
(:func:`analysis.stream_weights.skeleton`: the names the export wrote from): :meth:`CheckpointWeights.stage`
reads a stage's tensors from the checkpoint's safetensors files and gives a :class:`Swap`, which puts
them into the skeleton (each 4-bit Linear replaced by its ``Linear4bit``, every other parameter by the
checkpoint's, as saved) while the stage's batches run, then puts
the skeleton's own back. The forward thus runs bitsandbytes' own 4-bit matmul on the checkpoint's bytes;
:mod:`analysis.stream_variants` runs it as one more stream beside the 16-bit one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .stream_weights import DiskWeights, StreamingUnsupported, saved_names

#: the quant-state entries bitsandbytes saves beside a packed 4-bit weight (``weight.<part>``)
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                     "quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class ExportedCheckpoint:
    """A variant given by a pre-quantized bnb-4bit checkpoint of the model (the folder the export wrote)."""

    path: Path


@dataclass(frozen=True)
class FourBitState:
    """One 4-bit Linear of a checkpoint: its checkpoint keys (packed weight, quant-state entries by part)."""

    weight: str
    parts: dict[str, str]


class CheckpointWeights:
    """The tensors of a pre-quantized bnb-4bit checkpoint, by the live names of the source model's skeleton."""

    def __init__(self, path: str | Path, model: nn.Module):
        from transformers import BitsAndBytesConfig

        folder = Path(path)
        config = json.loads((folder / "config.json").read_text()).get("quantization_config") if (
            folder / "config.json").is_file() else None
        if not config or not config.get("load_in_4bit"):
            raise StreamingUnsupported(f"{folder} is not a bitsandbytes 4-bit checkpoint (its config.json has no "
                                       "quantization_config with load_in_4bit): pass the folder the export wrote")
        self.path, self.config = folder, BitsAndBytesConfig.from_dict(config)
        self.disk = DiskWeights(folder, model)
        self.four_bit = self._four_bit(model)
        if not self.four_bit:
            raise StreamingUnsupported(f"{folder} holds no packed 4-bit weight (no quant_state entries): pass the "
                                       "folder the export wrote")

    def _four_bit(self, model: nn.Module) -> dict[str, FourBitState]:
        """Module name -> its checkpoint keys, for every Linear saved packed (a ``quant_state`` entry beside it)."""
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        entries = [f"{n}.weight.{p}" for n in linears for p in QUANT_STATE_PARTS]
        saved = saved_names(model, [*entries, *(f"{n}.weight" for n in linears)])
        found = {}
        for name in linears:
            parts = {p: saved[e] for p in QUANT_STATE_PARTS
                     if (e := f"{name}.weight.{p}") in saved and saved[e] in self.disk.files}
            if any(p.startswith("quant_state.") for p in parts):
                found[name] = FourBitState(saved.get(f"{name}.weight", f"{name}.weight"), parts)
        return found

    def formats(self) -> dict[str, tuple[str, int]]:
        """Module name -> (quant type, blocksize) of every 4-bit Linear, from its saved quant state."""
        from bitsandbytes.utils import unpack_tensor_to_dict

        found = {}
        for name, state in self.four_bit.items():
            key = next(k for p, k in state.parts.items() if p.startswith("quant_state."))
            packed = unpack_tensor_to_dict(self.disk.raw(key))
            found[name] = (packed["quant_type"], int(packed["blocksize"]))
        return found

    def stage(self, model: nn.Module, names: list[str], device: str | torch.device = "cpu") -> Swap:
        """The checkpoint's version of the named parameters (a stage's): their 4-bit Linears built, the rest read;
        a tensor equal to the one ``model`` holds now (the 16-bit head, loaded in the checkpoint's dtype) is that
        one, not a copy, so the head holds a second lm_head only where the checkpoint's differs."""
        live = dict(model.named_parameters(remove_duplicate=False))
        params, modules = {}, {}
        for name in names:
            owner, _, _ = name.rpartition(".")
            if owner in self.four_bit:
                if owner not in modules:
                    modules[owner] = self._linear4bit(model.get_submodule(owner), owner, device)
                continue
            tensor = self.disk.read(name, None, device)
            mine = live[name]
            same = mine.device.type != "meta" and mine.dtype == tensor.dtype and torch.equal(mine, tensor)
            params[name] = mine if same else nn.Parameter(tensor, requires_grad=False)
        return Swap(params, modules)

    def held_bytes(self, model: nn.Module, names: list[str], dtype: torch.dtype) -> int:
        """Bytes :meth:`stage` holds for ``names`` beside ``model``'s own tensors loaded in ``dtype``: packed 4-bit
        weights, and every other tensor saved in another dtype (one saved in ``dtype`` is the export's cast of the
        same source weight: the same tensor, shared); from the files' headers, nothing read."""
        total = 0
        for name in names:
            owner, _, leaf = name.rpartition(".")
            if owner in self.four_bit:
                total += self.disk.numel(self.four_bit[owner].weight) if leaf == "weight" else 0
            elif (saved := self.disk.dtype(self.disk.key(name))) != dtype:
                total += self.disk.numel(self.disk.key(name)) * saved.itemsize
        return total

    def _linear4bit(self, linear: nn.Linear, name: str, device) -> nn.Module:
        """A ``Linear4bit`` from its packed weight and quant state, as transformers' loader builds it: the config's
        compute dtype and storage, ``Params4bit.from_prequantized``, the bias as saved."""
        import bitsandbytes as bnb

        state = self.four_bit[name]
        config = self.config
        with torch.device("meta"):
            module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                       config.bnb_4bit_compute_dtype,
                                       compress_statistics=config.bnb_4bit_use_double_quant,
                                       quant_type=config.bnb_4bit_quant_type,
                                       quant_storage=config.bnb_4bit_quant_storage)
        stats = {f"weight.{p}": self.disk.raw(k) for p, k in state.parts.items()}
        module.weight = bnb.nn.Params4bit.from_prequantized(self.disk.raw(state.weight, device), stats,
                                                           requires_grad=False, device=device, module=module)
        if linear.bias is not None:
            module.bias = nn.Parameter(self.disk.read(f"{name}.bias", None, device), requires_grad=False)
        return module.requires_grad_(False).eval()

    def footprint(self, model: nn.Module) -> int:
        """``get_memory_footprint()`` of the checkpoint loaded as the scoreboard reports it
        (:func:`analysis.memory.footprint_16bit`): packed weights at their bytes, other floating parameters at
        2 bytes, buffers at their own size; from the skeleton's shapes and the files' headers, nothing read."""
        from .memory import BYTES_16BIT

        total = sum(b.numel() * b.element_size() for b in model.buffers())
        owners = {id(p): n.rpartition(".")[0] for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            owner = owners[id(p)]
            if owner in self.four_bit and name.endswith(".weight"):
                total += self.disk.numel(self.four_bit[owner].weight) * self.config.bnb_4bit_quant_storage.itemsize
            else:
                total += p.numel() * (BYTES_16BIT if p.is_floating_point() else p.element_size())
        return total


@dataclass
class Swap:
    """A stage's tensors from the checkpoint: parameters by name, 4-bit Linears by module name."""

    params: dict[str, nn.Parameter]
    modules: dict[str, nn.Module]

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Put the checkpoint's tensors and modules into ``model``, and the model's own back on exit."""
        old_modules = {name: model.get_submodule(name) for name in self.modules}
        old_params = {name: _owner(model, name)._parameters[name.rpartition(".")[2]] for name in self.params}
        try:
            for name, module in self.modules.items():
                model.set_submodule(name, module)
            for name, param in self.params.items():
                _owner(model, name)._parameters[name.rpartition(".")[2]] = param
            yield
        finally:
            for name, module in old_modules.items():
                model.set_submodule(name, module)
            for name, param in old_params.items():
                _owner(model, name)._parameters[name.rpartition(".")[2]] = param

    def linear(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The checkpoint's Linear ``name`` as a function of its input (its ``Linear4bit``, or ``F.linear`` with
        the checkpoint's weight and bias): lm_head's, applied chunk by chunk once the swap is undone."""
        if name in self.modules:
            return self.modules[name]
        return partial(F.linear, weight=self.params[f"{name}.weight"], bias=self.params.get(f"{name}.bias"))


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])
