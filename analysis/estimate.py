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

from .formats import BYTES_16BIT, FourBit
from .gram import upper_elements
from .memory import non_module_bytes
from .micro_batches import CPU_ACTIVATION_BUDGET, sequence_activation_bytes, sequences_per_micro_batch
from .modules import list_modules, not_quantizable_reason, output_embedding_name
from .stream_head import BYTES_PER_LOGIT, MIN_CHUNK_BYTES, head_work_bytes, plain_head
from .vision import is_vision_language


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


#: Linears that read the very same tensor (one Gram matrix between them, :mod:`analysis.probe`)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query": "qkv", "key": "qkv", "value": "qkv",
                "gate_proj": "gate_up", "up_proj": "gate_up", "w1": "gate_up", "w3": "gate_up"}


@dataclass(frozen=True)
class PeakEstimate:
    """Resident bytes of the in-memory analysis (``analyze()``), part by part, from the config alone.

    ``statistics`` is 4 bytes per float over the distinct Linear inputs: each input's float32 Gram
    matrix as stored (its upper blocks, :func:`analysis.gram.upper_elements`; every batch adds to it in place, no
    second copy), plus its channel max |x| and 256-row
    sample. ``activations`` is one batch's
    hidden states, attention scores and MLP widths (with Fisher scores every layer's, which autograd keeps, for the
    sequences of one micro-batch on a text model: :mod:`analysis.micro_batches`, sized for the CPU) plus its
    logits when they are made, or, where it is larger, what a run keeps of the measurement after the pass: the
    packed 4-bit weights of every candidate in every 4-bit format (:mod:`analysis.packed`).
    """

    weights: int
    statistics: int
    activations: int
    distinct_inputs: int

    @property
    def total(self) -> int:
        return self.weights + self.statistics + self.activations


def estimate_peak(model: nn.Module, formats, *, dtype_bytes: int, batch_size: int, seq_len: int,
                  fisher: bool) -> PeakEstimate:
    """Peak memory of ``analyze()`` on the meta-device ``model`` (:func:`meta_model`) without reading a weight."""
    from .analyze import _reason

    lm_head = output_embedding_name(model)
    infos = list_modules(model)
    candidates = [i for i in infos if _reason(model, i, lm_head, formats) is None]
    widths: dict[tuple[str, str], int] = {}
    for info in candidates:
        parent, _, leaf = info.name.rpartition(".")
        widths[(parent, SHARED_INPUT.get(leaf, leaf))] = info.in_features
    statistics = sum(upper_elements(d) * 4 + 257 * d * 4 for d in widths.values())
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * (dtype_bytes if p.is_floating_point() else p.element_size()) for p in unique)
    text = model.config.get_text_config()
    tokens = batch_size * seq_len
    per_sequence = sequence_activation_bytes(text, seq_len)  # every layer's, which autograd keeps for the backward
    sequences = batch_size
    if fisher and plain_head(model) and not is_vision_language(model.config):  # text batches: micro-batches
        sequences = min(batch_size, sequences_per_micro_batch(text, seq_len, CPU_ACTIVATION_BUDGET))
    layers = max(getattr(text, "num_hidden_layers", 1), 1)
    activations = per_sequence * sequences if fisher else per_sequence // layers * batch_size  # else one layer's
    vocab = getattr(text, "vocab_size", 0)
    measured_head = any(i.name == lm_head for i in candidates)
    # a forward-only batch makes logits only where lm_head is measured and its logits are not plain lm_head(hidden)
    # (analysis.analyze._forward_step); the Fisher pass's batches make them whole, or in token chunks where plain
    whole = measured_head and not plain_head(model)
    logits = tokens * vocab * (BYTES_PER_LOGIT if fisher else dtype_bytes if whole else 0)
    if fisher and plain_head(model):  # the Fisher pass makes its logits in token chunks (analysis.stream_head)
        hidden = getattr(text, "hidden_size", 0)
        logits = head_work_bytes(max(vocab * hidden * dtype_bytes, MIN_CHUNK_BYTES), vocab, sequences * seq_len,
                                 hidden)
    packed = sum(f.storage_bytes(i.shape) for i in candidates for f in formats if isinstance(f, FourBit))
    return PeakEstimate(int(weights), int(statistics), int(max(activations + logits, packed)), len(widths))



def checkpoint_bytes(path: str | Path) -> int | None:
    """Bytes of the safetensors weights on disk (the index's total size, else the file sizes); None if none."""
    import json

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
