"""Model sizes from the config and shapes alone, before any weight is read.

The model is built on the meta device (accelerate's ``init_empty_weights``), so a budget can
be checked against the all-4-bit size before the calibration pass, whatever the model's size.
Bytes are counted as the sensitivity table counts them (:mod:`analysis.memory`,
:meth:`FourBit.storage_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .formats import BYTES_16BIT
from .memory import non_module_bytes
from .modules import list_modules, not_quantizable_reason, output_embedding_name


@dataclass(frozen=True)
class SizeEstimate:
    """Checkpoint bytes of a model in all-4-bit (transformers' default skips) and in 16-bit."""

    bytes_all_4bit: int
    bytes_16bit: int
    linear_modules: int


def meta_model(path: str | Path) -> nn.Module:
    """The model of ``path`` (causal LM or vision-language) with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .models import auto_class

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = auto_class(config).from_config(config)
    model.tie_weights()  # as from_pretrained does
    return model


def estimate_sizes(path: str | Path, fmt) -> SizeEstimate:
    """All-4-bit and 16-bit checkpoint bytes of the model at ``path`` in 4-bit format ``fmt``, from its config."""
    model = meta_model(path)
    linears = [i for i in list_modules(model) if i.is_linear]
    lm_head = output_embedding_name(model)
    other = non_module_bytes(model, [i.name for i in linears])["storage"]
    four = sixteen = other
    for info in linears:
        size = info.params * BYTES_16BIT
        sixteen += size
        quantized = info.name != lm_head and not_quantizable_reason(info, [fmt]) is None
        four += fmt.storage_bytes(info.shape) if quantized else size
    return SizeEstimate(int(four), int(sixteen), len(linears))
