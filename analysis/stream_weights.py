"""Weights for streaming analysis: a meta-device skeleton, filled one stage at a time from disk.

The model is built with accelerate's ``init_empty_weights`` (parameters on the meta device,
no memory), so module names, shapes, groups and byte counts are known before any weight is
read. A stage's parameters are then read from the memory-mapped safetensors files
(``safe_open``), cast to the analysis dtype exactly as ``from_pretrained(dtype=...)`` does,
and put back on the meta device once the stage is measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .gram import upper_elements


class StreamingUnsupported(ValueError):
    """The model or request cannot be analyzed block by block."""


def release_freed_blocks() -> None:
    """Make glibc give every freed block of 1 MiB or more back to the OS at once.

    glibc raises its mmap threshold after large frees (up to 32 MiB), so a stage's tensors
    would later come from the heap, which fragments and only grows: peak RSS crept up ~15 MB
    per block on the streaming benchmark. A fixed threshold keeps it flat. No-op elsewhere.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def skeleton(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``path`` (causal LM or vision-language model) with every parameter on the meta device
    (buffers stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .models import auto_class

    config = AutoConfig.from_pretrained(path)
    try:
        with init_empty_weights():
            model = auto_class(config).from_config(config, dtype=dtype)
    except ValueError as err:  # neither a causal LM nor an image-text-to-text model: an encoder, ...
        raise StreamingUnsupported(
            f"streaming analysis handles decoder LLMs and vision-language models, not {type(config).__name__}: run "
            f"without --max-memory") from err
    model.tie_weights()  # from_pretrained ties an lm_head to the embedding; from_config leaves it apart
    model.config.name_or_path = str(path)
    return model.eval()


class DiskWeights:
    """Tensor name -> safetensors file of a ``save_pretrained`` folder, read on demand.

    Tied parameters (an lm_head sharing the embedding) are saved once; the aliases are taken
    from the skeleton before any stage replaces a parameter and breaks the tie.
    """

    def __init__(self, path: str | Path, model: nn.Module):
        from .models import check_weight_files

        self.aliases = _tied_aliases(model)
        self.saved = _saved_names(model)
        folder = Path(path)
        check_weight_files(folder)  # a truncated file: one clear error, not a SafetensorError traceback
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in mapping.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}
        else:
            raise StreamingUnsupported(
                f"streaming analysis reads safetensors weights, and {folder} has none: re-save the model with "
                f"save_pretrained(..., safe_serialization=True), or run without --max-memory"
            )

    def load(self, model: nn.Module, names: list[str], dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        """Materialize the named parameters on ``device`` from disk (tied ones from their source)."""
        from safetensors import safe_open

        keys = {name: self.key(name) for name in names}
        by_file: dict[Path, list[str]] = {}
        for name, key in keys.items():
            by_file.setdefault(self.files[key], []).append(name)
        for file, group in by_file.items():
            with safe_open(file, "pt") as f:
                for name in group:
                    _set_param(model, name, _cast(f.get_tensor(keys[name]), dtype, device))

    def read(self, name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
        """One parameter (a tied one from its source) read from disk, cast as :meth:`load` casts it."""
        from safetensors import safe_open

        key = self.key(name)
        with safe_open(self.files[key], "pt") as f:
            return _cast(f.get_tensor(key), dtype, device)

    def raw(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor saved under the checkpoint key ``key``, as saved (no cast): a quant state's float32 stays so."""
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key).to(device)

    def numel(self, key: str) -> int:
        """Elements of the tensor saved under ``key``, read from the file's header alone."""
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as f:
            return math.prod(f.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of the tensor saved under ``key``, read from the file's header alone."""
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as f:
            return _SAFETENSORS_DTYPES[f.get_slice(key).get_dtype()]

    def check_readable(self, names: list[str]) -> None:
        """Every named parameter has its checkpoint key (:meth:`key`), or one StreamingUnsupported naming the fix
        before any work (fused MoE experts, saved one tensor per expert, failed after the embedding stage)."""
        for name in names:
            try:
                self.key(name)
            except StreamingUnsupported as err:
                raise StreamingUnsupported(f"{err}: run without --max-memory") from None

    def key(self, name: str) -> str:
        """The checkpoint key that holds the live parameter ``name`` (or one it is tied to)."""
        lives = [name, *self.aliases.get(name, [])]
        for live in lives:
            for key in (live, self.saved.get(live)):
                if key in self.files:
                    return key
        if not any(live in self.saved for live in lives):
            raise StreamingUnsupported(f"weight {name} is saved split or merged with others (as transformers saves "
                                       "fused MoE experts: one tensor per expert), which the stream cannot read")
        raise StreamingUnsupported(f"weight {name} is not in the checkpoint's safetensors files")


#: safetensors' header dtype names (the ones a checkpoint of floating and packed weights holds)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                       "BOOL": torch.bool}


def move_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Put the skeleton's real buffers (rotary frequencies, ...) on ``device``, where the blocks will run."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[key] = buffer.to(device)


def unload(model: nn.Module, names: list[str]) -> None:
    """Put the named parameters back on the meta device, freeing their memory."""
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        current = model.get_submodule(module_name)._parameters[leaf]
        _set_param(model, name, torch.empty(current.shape, dtype=current.dtype, device="meta"))


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    """A checkpoint tensor as ``from_pretrained(dtype=...)`` holds it: floating ones in ``dtype``, others as saved
    (``dtype`` None: every one as saved)."""
    return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)


def _saved_names(model: nn.Module) -> dict[str, str]:
    """Live parameter name -> the name ``save_pretrained`` writes (:func:`saved_names` of every parameter)."""
    return saved_names(model, [n for n, _ in model.named_parameters(remove_duplicate=False)])


def saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Live state-dict key -> the key ``save_pretrained`` writes, where transformers 5 renames it.

    A vision-language model's live names (``model.language_model.layers.0…``) are saved in the
    hub layout (``model.layers.0…``, ``visual.…``); transformers' own reversal gives each key's,
    traced by an index tensor per key (renamings keep a tensor whole). A key the reversal does
    more than rename (merges or splits it) is left out; without transformers 5 every key maps to itself.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the live names are the saved names
        return {n: n for n in names}

    def traced(part: list[str]) -> dict[str, str]:
        saved = revert_weight_conversion(model, {n: torch.tensor(names.index(n)) for n in part})
        return {names[int(v)]: k for k, v in saved.items() if torch.is_tensor(v) and v.dim() == 0}

    try:
        return traced(names)
    except (IndexError, RuntimeError, ValueError):  # a split (fused MoE experts, saved per expert) fails on an index
        pass
    mapped: dict[str, str] = {}
    for name in names:  # key by key, leaving out the ones the reversal splits
        try:
            mapped.update(traced([name]))
        except (IndexError, RuntimeError, ValueError):
            continue
    return mapped


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> the other names of the same (tied) parameter."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in groups.values() for n in names}


def stage_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes the named parameters take once materialized."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(params[n].numel() * params[n].element_size() for n in names)


#: memory the process keeps once the first block has run, beyond the imports and the estimate
#: below (math libraries' work buffers, allocator state): ~120-150 MB, flat over 12-64 blocks on
#: the streaming benchmark (benchmarks/streaming.py). Like the ~0.5 GB of Python and libraries it
#: does not grow with the model, so the cap does not cover it: it is reported beside the need.
RUNTIME_BYTES = 160 * 10**6

#: autograd keeps about this many times a block's forward activations for the backward step
GRAD_ACTIVATION_FACTOR = 2


def stage_need(model: nn.Module, param_names: list[str], linears: list[str], batch_tokens: int,
               batch_size: int, *, head: bool = False, backward: bool = False, device_type: str = "cpu",
               config=None) -> dict:
    """Estimated resident bytes while one stage runs and is measured (weights + statistics + work space).

    Statistics: one float32 Gram matrix as stored (its upper blocks; plus absmax and a 256-row sample) per
    hooked Linear, counted without sharing, so the estimate errs high. Work space: the larger of the
    measurement (one bitsandbytes round trip of the largest weight on ``device_type`` plus a few
    row chunks, :func:`analysis.measure.measure_work_bytes`) and one batch's activations
    (in and out of the block, the attention scores, the MLP's intermediate width), twice that
    for a backward step (``backward``: Fisher scores' reverse pass). The head never holds a whole batch's logits: its forward
    step makes none, and its backward step makes them one chunk at a time, about its own
    weight bytes (:mod:`analysis.stream_head`). ``config`` gives the activations' widths (default: the
    language model's; a vision block passes the vision tower's). ``runtime`` (:data:`RUNTIME_BYTES`) is reported
    but not in ``total``: with Python and the libraries (~0.5 GB) it is what the cap leaves out.
    """
    from .measure import measure_work_bytes
    from .stream_head import head_work_bytes

    config = config or model.config.get_text_config()
    modules = dict(model.named_modules())
    shapes = [modules[n].weight.shape for n in linears]
    stats = sum(upper_elements(s[1]) * 4 + s[1] * 4 * 257 + (s[0] * 4 if backward else 0) for s in shapes)
    params = dict(model.named_parameters(remove_duplicate=False))
    described = max((params[n].numel() for n in param_names if params[n].dim() == 2), default=0)
    measure = max([measure_work_bytes(s[0] * s[1], device_type, width=s[1]) for s in shapes]
                  + [measure_work_bytes(described, device_type, roundtrip=False)])  # every weight is described
    hidden, intermediate, heads = _widths(config)
    weights = stage_bytes(model, param_names)
    if head:
        activations = batch_tokens * hidden * 8
        if backward:
            activations = head_work_bytes(weights, getattr(config, "vocab_size", 0), batch_tokens, hidden)
    else:
        widths = hidden * 8 + intermediate * 4
        seq = math.ceil(batch_tokens / max(batch_size, 1))
        activations = batch_tokens * widths * 4 + batch_size * heads * seq * seq * 4
        activations *= GRAD_ACTIVATION_FACTOR if backward else 1
    work = max(measure, activations)
    return {"weights": weights, "statistics": stats, "work": work, "runtime": RUNTIME_BYTES,
            "total": weights + stats + work}


def _widths(config) -> tuple[int, int, int]:
    """(hidden width, MLP width, attention heads) of a language model's or a vision tower's config.

    Qwen2-VL's vision config names its width ``embed_dim`` (its ``hidden_size`` is the language
    model's) and its MLP width ``mlp_ratio`` × that.
    """
    hidden = getattr(config, "embed_dim", None) or getattr(config, "hidden_size", 0)
    intermediate = getattr(config, "intermediate_size", None) or int(hidden * getattr(config, "mlp_ratio", 0))
    heads = next((v for k in ("num_attention_heads", "num_heads", "attention_heads")
                  if isinstance(v := getattr(config, k, None), int)), 1)
    return hidden, intermediate, heads
