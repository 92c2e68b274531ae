"""export(): write a dynamic-bnb-4bit checkpoint that plain ``from_pretrained`` loads.

The model is loaded through transformers with ``BitsAndBytesConfig(load_in_4bit=True, ...,
llm_int8_skip_modules=plan.skip_modules)``; tokenizer/processor, generation config, the plan
and a model card are written beside it. Everything goes to a temporary folder next to the
target, is reloaded from there with plain ``from_pretrained`` and checked (every planned
module a plain Linear, every other quantizable one a ``Linear4bit``), and only then renamed
into place: a crash or a failed check never leaves a half checkpoint at ``out_dir``. An
existing ``out_dir`` is replaced only if quantplan wrote it (it holds ``quantplan_plan.json``) and
``--overwrite`` says so; any other non-empty folder is refused, so no user file is ever deleted.

A plan over a blocksize menu (4-bit modules in more than one format, e.g. ``nf4`` and ``nf4-bs32``)
cannot be expressed as a ``BitsAndBytesConfig``: its checkpoint is written pre-quantized instead,
tensor by tensor from the source's safetensors files (:mod:`planner.prequantized_stream`: one tensor
and one output shard in memory, never the 16-bit model; a source without safetensors files loads the
16-bit model whole, :mod:`planner.prequantized`; under ``max_memory`` its shards are an eighth of the
cap, :func:`planner.prequantized_stream.shard_bytes_for`), then reloaded and checked the same way, plus
each 4-bit module's loaded blocksize against the plan. A single-format plan keeps the
transformers path (its ``BitsAndBytesConfig`` is the one ``plan.json`` shows, ready to paste).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantplan.analysis.equalize import Equalization, apply_equalization
from quantplan.analysis.models import ModelSource, load_processor
from quantplan.analysis.stream_weights import StreamingUnsupported
from quantplan.common.modes import apply_umask, staging_dir

from .modelcard import write_model_card
from .plan_types import KEEP, Plan
from .prequantized import MenuExportError, check_blocksizes, menu_formats, write_prequantized
from .prequantized_stream import Reuse, shard_bytes_for, write_streamed

PLAN_MARKER = "quantplan_plan.json"  # in every exported folder: what makes it quantplan's to replace


class ExportError(RuntimeError):
    """The exported checkpoint does not realise the plan."""


@dataclass
class ExportResult:
    path: Path
    footprint_bytes: int  # model.get_memory_footprint() after reload
    checkpoint_bytes: int  # tensor bytes in the saved safetensors files
    kept: int
    quantized: int


def bnb_config(plan: Plan, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers BitsAndBytesConfig that realises ``plan``."""
    from transformers import BitsAndBytesConfig

    non_4bit = sorted({c for c in plan.choices.values() if c not in (KEEP, plan.quant.get("name"))})
    if non_4bit:
        raise ExportError(
            f"the plan uses {non_4bit} for some modules, but a bitsandbytes checkpoint holds one 4-bit format "
            f"plus 16-bit: plan with --tiers {plan.quant.get('name', 'nf4')} to export"
        )
    if plan.quant.get("blocksize", 64) != 64:
        raise ExportError("transformers' BitsAndBytesConfig always uses blocksize 64: analyze with --blocksize 64")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant.get("name", "nf4"),
        bnb_4bit_use_double_quant=bool(plan.quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(plan.skip_modules),
    )


def export(source: ModelSource, plan: Plan, out_dir: str | Path, *, overwrite: bool = False,
           compute_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
           max_memory: int | None = None, reuse: Reuse | None = None) -> ExportResult:
    """Quantize ``source`` as ``plan`` says and save it to ``out_dir`` (atomically, verified); ``max_memory``
    (bytes, a run's ``--max-memory``) bounds the output shards a blocksize-menu plan is written in; ``reuse``: the
    packed 4-bit weights a run's analysis made, taken where they were made from the very values written
    (:func:`planner.prequantized_stream.write_streamed`)."""
    out_dir = Path(out_dir).resolve()
    plan.check_model(source.fingerprint)
    check_out_dir(out_dir, overwrite)
    # scaled weights are written by quantplan's own writer: transformers would quantize the source's
    config = None if plan.mixed_blocksizes or plan.equalized or not plan.used_formats else bnb_config(plan, compute_dtype)
    if config is None:
        try:
            menu_formats(plan)  # an unwritable plan fails before any model is loaded
        except MenuExportError as err:
            raise ExportError(str(err)) from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_dir.parent, prefix=f".{out_dir.name}.partial-")
    try:
        if not plan.used_formats:  # every module 16-bit: a plain 16-bit checkpoint, as the plan's warning says
            _load_16bit(source, compute_dtype, device).save_pretrained(staging)
        elif config is None:
            _write_menu(source, plan, staging, compute_dtype, device, max_memory, reuse)
        else:
            model = _load_quantized(source.path, config, compute_dtype, device)
            check_module_types(model, plan)
            model.save_pretrained(staging)
            del model
        load_processor(source).save_pretrained(staging)
        keep_processor_files(Path(source.path), staging)
        gc.collect()
        plan.save(staging / PLAN_MARKER)
        reloaded = _load_plain(staging, device)
        check_module_types(reloaded, plan)
        if wrong := check_blocksizes(reloaded, plan):
            raise ExportError("the checkpoint does not follow the plan's blocksizes: " + "; ".join(wrong[:5]))
        result = ExportResult(out_dir, int(reloaded.get_memory_footprint()), checkpoint_tensor_bytes(staging),
                              len(plan.kept), len(plan.choices) - len(plan.kept))
        del reloaded
        write_model_card(staging / "README.md", source, plan, result)
        apply_umask(staging)  # save_pretrained writes model.safetensors 0600
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


#: processor files a source may hold beside what its re-saved processor writes: the image processor's own file
#: (hub folders; the video processor falls back to it) and the video processor's
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
VIDEO_ENTRY = "video_processor"


def keep_processor_files(source_dir: Path, staging: Path) -> None:
    """Copy the source's processor files the re-saved processor did not write, and its ``processor_config.json``'s
    video entry. Without torchvision quantplan loads a VLM's processor for images only (:mod:`analysis.processors`),
    which saves no video half; ``AutoProcessor`` then refuses the checkpoint (no video processor configuration) even
    where torchvision is installed."""
    for name in PROCESSOR_FILES:
        if (source_dir / name).is_file() and not (staging / name).exists():
            shutil.copyfile(source_dir / name, staging / name)
    source_config, saved_config = source_dir / "processor_config.json", staging / "processor_config.json"
    if source_config.is_file() and saved_config.is_file():
        video = json.loads(source_config.read_text()).get(VIDEO_ENTRY)
        saved = json.loads(saved_config.read_text())
        if video is not None and VIDEO_ENTRY not in saved:
            saved_config.write_text(json.dumps({**saved, VIDEO_ENTRY: video}, indent=2, sort_keys=True) + "\n")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` whose replacement would lose anything: a file, a non-empty folder quantplan
    did not write (no ``quantplan_plan.json``; refused even with ``--overwrite``), or a quantplan
    checkpoint without ``overwrite``. An empty folder is free."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder: choose another --out")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if PLAN_MARKER not in entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise FileExistsError(
            f"{out_dir} already exists and holds files quantplan did not write ({shown}); --overwrite only "
            f"replaces a folder written by quantplan export (with {PLAN_MARKER}): choose another --out, "
            "or move those files away")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")


def check_module_types(model: nn.Module, plan: Plan) -> None:
    """Every planned 16-bit module a plain Linear, every planned 4-bit one a bitsandbytes Linear4bit."""
    import bitsandbytes as bnb

    modules = dict(model.named_modules())
    missing = [n for n in plan.choices if n not in modules]
    if missing:
        raise ExportError(f"the loaded model has no module named {missing[:3]}: the plan was made for another "
                          "module tree (re-run analyze on this model)")
    wrong = []
    for name, choice in plan.choices.items():
        is_4bit = isinstance(modules[name], bnb.nn.Linear4bit)
        if (choice == KEEP) == is_4bit:
            wrong.append(f"{name} is {type(modules[name]).__name__}, planned {choice}")
    if wrong:
        raise ExportError("the checkpoint does not follow the plan: " + "; ".join(wrong[:5]))


def checkpoint_tensor_bytes(folder: Path) -> int:
    """Bytes of all tensors stored in a folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                count = 1
                for d in shape:
                    count *= d
                total += count * _DTYPE_BYTES.get(dtype, 1)
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _write_menu(source: ModelSource, plan: Plan, staging: Path, compute_dtype: torch.dtype, device: str,
                max_memory: int | None = None, reuse: Reuse | None = None) -> None:
    """A menu plan's pre-quantized checkpoint, streamed tensor by tensor from the source's safetensors files;
    a source the stream cannot read (``.bin`` weights) is loaded whole in 16-bit instead, saying so."""
    try:
        write_streamed(source.path, plan, staging, compute_dtype, device, shard_bytes_for(max_memory), reuse)
    except StreamingUnsupported as err:
        print(f"quantplan: export: {err}, so the blocksize-menu checkpoint is written from the 16-bit model "
              "loaded whole")
        model = _load_16bit(source, compute_dtype, device)
        apply_equalization(model, Equalization.from_dict(plan.equalization))
        write_prequantized(model, plan, staging, compute_dtype)


def _load_quantized(path, config, compute_dtype, device):
    from quantplan.analysis.models import load_model, resolve_source

    return load_model(resolve_source(str(path)), dtype=compute_dtype, device=device, quantization_config=config)


def _load_16bit(source, compute_dtype, device):
    from quantplan.analysis.models import load_model

    return load_model(source, dtype=compute_dtype, device=device)


def _load_plain(path, device):
    from quantplan.analysis.models import load_model, resolve_source

    return load_model(resolve_source(str(path)), dtype="auto", device=device)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(trash / "old")
        staging.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out_dir)
