"""Write a pre-quantized bitsandbytes checkpoint whose 4-bit modules carry their own blocksizes.

transformers' ``BitsAndBytesConfig`` has no blocksize field: quantizing on load gives every module
blocksize 64. A plan over a blocksize menu (``nf4`` = blocksize 64, ``nf4-bs32``...) is therefore
written here, tensor by tensor, in transformers' pre-quantized layout: each 4-bit module's
``weight`` is bitsandbytes' packed uint8 tensor from ``quantize_4bit`` at the planned blocksize
(NF4, double quant), followed by its ``QuantState.as_dict(packed=True)`` entries (``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``); 16-bit modules keep their weights and are named in
``llm_int8_skip_modules``; ``config.json`` holds ``BitsAndBytesConfig(load_in_4bit=True, ...)``.
Plain ``from_pretrained`` then builds each ``Linear4bit`` from its own saved quant state
(bitsandbytes' ``Params4bit.from_prequantized``), so each takes the blocksize it was written with.

The checkpoint is normally streamed from the source's safetensors files, one tensor at a time
(:mod:`planner.prequantized_stream`); :func:`write_prequantized` saves it from a loaded 16-bit
model, for sources the stream cannot read (``.bin`` weights). Both share the keys, quant states
and config written here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantplan.analysis.formats import FourBit, format_from_dict

from .plan_types import KEEP, Plan


class MenuExportError(RuntimeError):
    """A plan the pre-quantized writer cannot realise."""


def menu_formats(plan: Plan) -> dict[str, FourBit]:
    """``{tier: FourBit}`` for the plan's 4-bit formats; refuses a plan with a format that is not 4-bit."""
    formats = {t: format_from_dict(plan.format_of(t)) for t in plan.used_formats}
    if other := sorted(t for t, f in formats.items() if not isinstance(f, FourBit)):
        raise MenuExportError(
            f"the plan uses {other} for some modules, but a bitsandbytes 4-bit checkpoint holds 4-bit formats "
            f"plus 16-bit only: plan with --tiers {','.join(t for t in plan.tiers if t not in other)} to export")
    if not all(f.double_quant for f in formats.values()):
        raise MenuExportError("the blocksize menu is written with double quant (what transformers and Unsloth's "
                              "kernels assume): analyze without --no-double-quant")
    return formats


def planned_weight_keys(plan: Plan) -> dict[str, str]:
    """``{"<module>.weight": tier}`` for every module the plan puts in 4-bit."""
    return {f"{name}.weight": tier for name, tier in plan.choices.items() if tier != KEEP}


def menu_quantization_config(plan: Plan, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` saved in a menu checkpoint's ``config.json``: 4-bit, double quant, the plan's
    skip list; its quant type is the reference format's (each tensor's own quant state overrides it on load)."""
    from transformers import BitsAndBytesConfig

    formats = menu_formats(plan)
    reference = format_from_dict(plan.quant) if plan.quant else next(iter(formats.values()))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=reference.quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(plan.skip_modules),
    )


def quantized_state_dict(model: nn.Module, plan: Plan, formats: dict[str, FourBit]) -> dict[str, torch.Tensor]:
    """The model's state dict with every planned 4-bit weight replaced by bitsandbytes' packed tensors."""
    state = dict(model.state_dict())
    for key, tier in planned_weight_keys(plan).items():
        if key not in state:
            raise MenuExportError(f"the model has no weight {key}: the plan was made for another module tree "
                                  "(re-run analyze on this model)")
        packed, quant_state = formats[tier].quantize(state.pop(key))
        state[key] = packed
        for part, tensor in quant_state.as_dict(packed=True).items():
            state[f"{key}.{part}"] = tensor
    return state


def write_prequantized(model: nn.Module, plan: Plan, folder: Path, compute_dtype: torch.dtype) -> None:
    """Save the loaded 16-bit ``model`` as ``plan`` says, pre-quantized, into ``folder`` (config, weights,
    generation config); ``model`` must not be used afterwards (its config now carries the quantization config).
    For sources :func:`planner.prequantized_stream.write_streamed` cannot read tensor by tensor."""
    state = quantized_state_dict(model, plan, menu_formats(plan))
    model.config.quantization_config = menu_quantization_config(plan, compute_dtype)
    model.save_pretrained(folder, state_dict=state)


def check_blocksizes(model: nn.Module, plan: Plan) -> list[str]:
    """Every planned 4-bit module's loaded ``weight.quant_state`` has the plan's blocksize and quant type;
    returns the mismatches (empty when the checkpoint follows the plan)."""
    modules = dict(model.named_modules())
    wrong = []
    for name, tier in plan.choices.items():
        if tier == KEEP:
            continue
        expected = plan.format_of(tier)
        state = getattr(getattr(modules.get(name), "weight", None), "quant_state", None)
        got = (getattr(state, "blocksize", None), getattr(state, "quant_type", None))
        want = (expected.get("blocksize"), expected.get("quant_type", expected.get("name")))
        if got != want:
            wrong.append(f"{name} loaded with blocksize/quant type {got}, planned {tier} {want}")
    return wrong
