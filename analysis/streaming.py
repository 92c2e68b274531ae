"""analyze_streaming(): the same sensitivity table as analyze(), one block in memory at a time.

For a decoder LLM saved as safetensors (``model.model.layers``: Llama, SmolLM2, Qwen2, Mistral
...), the loop is llm-compressor's sequential pipeline:

1. build the model on the meta device (no weights in memory);
2. stage 0: load the embeddings, run each calibration batch up to the first decoder layer and
   keep what that layer receives (hidden states + keyword arguments: position embeddings,
   mask); measure the embedding rows;
3. stage 1..L: load block i from the memory-mapped safetensors, run every batch through it
   with the input probes attached (:mod:`analysis.probe`), measure its Linears exactly as
   ``analyze()`` does (:mod:`analysis.measure`), write the outputs for the next block, free
   the block and its statistics;
4. last stage: final norm + lm_head the same way (lm_head's input is probed; no logits are made).

A vision-language model whose tower is one stack of blocks (Qwen2-VL, Qwen2.5-VL, LLaVA with a
CLIP or Pixtral tower, Idefics3, SmolVLM) adds its vision tower's stages in front (the stem,
each vision block, then the merger + embeddings stage that splices the streamed image
features into the token embeddings through the model's own forward): the same loop, more
stages (:mod:`analysis.stream_stages`, :mod:`analysis.stream_vision`). Mllama (Llama 3.2 Vision)
streams its two stacks of vision blocks the same way, and its decoder's cross-attention layers
read the projected image features as a keyword argument carried with the hidden states
(:mod:`analysis.stream_mllama`).

Resident memory is one stage's weights, its input statistics and one batch (the head's
logits one chunk of tokens at a time, :mod:`analysis.stream_head`); activations carried
between blocks live on disk (:mod:`analysis.stream_store`), which also makes every finished
step a checkpoint that ``resume=True`` continues from.

Fisher scores (``fisher=True``, the default objective's input) add a reverse pass
(:mod:`analysis.stream_steps`): the forward steps keep every block's inputs on disk, the head
computes the gradient of the sampled next-token loss with respect to its input, and each
block, last to first, is loaded again, recomputes its forward from its stored input with
gradients on, backpropagates the stored gradient of its output with the same hooks as
``analyze()`` and is measured there, storing the gradient of its input for the block below.
For a vision-language model the gradient goes on through the splice into the vision blocks,
as the in-memory backward pass lets it reach the vision tower (:func:`analysis.fisher.loss_backward`).

The quantized-context scores (``context=True``, ``--context``) add the gradient pass of the all-4-bit
model's KL from 16-bit, block by block (:mod:`analysis.stream_gains`: the 16-bit and the all-4-bit
streams forward, the KL's gradient at the head in token chunks, then each block backward with the
same hooks as :func:`analysis.endtoend.restore_gains`), and fill the same columns as ``analyze(context=True)``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from quantplan.common.sizes import cap_above, format_bytes, parse_size

from .analyze import PARTIAL_DIR, _reason, _table_meta, context_modules, fill_context
from .calibration import CalibrationSet
from .distributed import Shard
from .fisher import GradientProbe
from .fisher_windows import BackwardShare, backward_share
from .formats import NF4, format_to_dict
from .models import resolve_source
from .modules import (
    check_something_to_quantize,
    list_modules,
    output_embedding_name,
    refuse_quantized,
    warn_bare_matrices,
)
from .output_energy import OutputEnergy
from .probe import InputProbe
from .stream_gains import check_gradient_fits, refuse_unreachable, streamed_restore_gains
from .stream_head import chunk_tokens, refuse_logit_transforms
from .stream_stages import VISION_KINDS, Stage, StageKind, stage_config, stages_of
from .stream_steps import Direction, StepContext, measure_stage, plan_steps, run_batches, step_folders
from .stream_store import StreamCheckpoint
from .stream_variants import StreamOptions
from .stream_weights import (
    DiskWeights,
    StreamingUnsupported,
    move_buffers,
    release_freed_blocks,
    skeleton,
    stage_bytes,
    stage_need,
    unload,
)
from .table import SensitivityTable


def analyze_streaming(path, calibration, formats=(NF4,), *, max_memory: str | int | None = None,
                      dtype: torch.dtype = torch.bfloat16, model_id: str | None = None,
                      model_fingerprint: str | None = None, batch_size: int = 4, out_dir: str | Path | None = None,
                      resume: bool = False, progress: bool = True, fisher: bool = False,
                      device: str | torch.device = "cpu", context: bool = False,
                      fisher_samples: int | None = None) -> SensitivityTable:
    """Measure the model saved in ``path`` block by block; returns the table ``analyze()`` would.

    Each block runs on ``device`` (``"cuda"``: one block's weights, statistics and one batch on
    the GPU at a time; the activations between blocks stay on disk), the same loop as on the CPU.

    ``max_memory`` (``"2GB"``, ``"1500MiB"``, bytes) is checked against the largest stage's
    estimated need before anything runs. With ``out_dir`` every finished step is checkpointed
    in ``out_dir/partial`` and ``resume=True`` continues from the last one. ``fisher`` adds
    the reverse pass that fills ``output_fisher_error`` as ``analyze(fisher=True)`` does, backpropagating the first
    batches that hold ``fisher_samples`` windows as analyze() does (None: a quarter, at least 8); ``context`` the
    quantized-context gradient pass that fills ``restore_gain`` and ``context_output_rel_error`` as
    ``analyze(context=True)`` does (:mod:`analysis.stream_gains`).
    """
    if Shard.current().world > 1:
        raise StreamingUnsupported("streaming analysis runs in one process: launch it without torchrun, or drop "
                                   "--max-memory to share the calibration batches between processes")
    formats = list(formats)
    release_freed_blocks()
    device = torch.device(device)
    model = skeleton(path, dtype)
    move_buffers(model, device)
    refuse_quantized(model)
    weights = DiskWeights(path, model)
    infos = list_modules(model)
    lm_head = output_embedding_name(model)
    refuse_logit_transforms(model)
    reasons = {i.name: _reason(model, i, lm_head, formats) for i in infos}
    check_something_to_quantize(infos, reasons, lm_head)
    warn_bare_matrices(model, infos)
    candidates = [i.name for i in infos if reasons[i.name] is None]
    stages = stages_of(model, infos, lm_head)
    if isinstance(calibration, CalibrationSet) and any(s.kind in VISION_KINDS for s in stages):
        raise StreamingUnsupported("a vision-language model calibrated on text (--text-only) is analyzed in memory "
                                   "only: run --text-only without --max-memory, or calibrate with --images")
    weights.check_readable([n for stage in stages for n in stage.resident])  # before the first batch runs
    vocab = model.config.get_text_config().vocab_size
    share = backward_share(calibration, batch_size, fisher_samples) if fisher else BackwardShare(0, 0)
    ctx = StepContext(model, calibration, batch_size, lm_head,
                      chunk_tokens(stage_bytes(model, [lm_head + ".weight"]), vocab), device, share.batches)
    if max_memory is not None:
        _check_fits(model, stages, candidates, parse_size(max_memory), calibration, batch_size, fisher, device.type)
    options = StreamOptions(dtype=dtype, batch_size=batch_size, device=str(device), max_memory=max_memory,
                            progress=progress)
    if context:  # before the analysis spends any time
        refuse_unreachable(stages, candidates)
        if max_memory is not None:
            check_gradient_fits(model, stages, {n for n in candidates if n != lm_head}, parse_size(max_memory),
                                calibration, options)
    fingerprint = model_fingerprint or resolve_source(str(path)).fingerprint
    run_meta = {"model_fingerprint": fingerprint, "calibration": calibration.meta,
                "formats": [format_to_dict(f) for f in formats], "batch_size": batch_size,
                "candidates": candidates, "dtype": str(dtype), "streaming": True, "fisher": fisher,
                "fisher_batches": share.batches}
    meta = _table_meta(model, model_id, fingerprint, calibration, formats, infos, fisher)  # before ties break
    if fisher:
        meta["fisher_samples"] = share.windows
    scratch = None if out_dir else tempfile.TemporaryDirectory(prefix="quantplan-stream-")
    store = StreamCheckpoint(Path(out_dir) / PARTIAL_DIR if out_dir else Path(scratch.name) / PARTIAL_DIR, run_meta,
                             calibration.num_batches(batch_size))
    steps = plan_steps(len(stages), fisher)
    done, rows = store.start(resume)
    for number in tqdm(range(done, len(steps)), desc="streamed blocks", disable=not progress):
        step = steps[number]
        stage = stages[step.stage]
        folders = step_folders(store, step, len(stages), fisher)
        measured = [n for n in stage.linears if n in candidates] if step.measure else []
        weights.load(model, stage.resident, dtype, device)  # on-load the block
        try:
            outputs = store.output_folder(folders.target)
            probe = InputProbe(model, measured)  # a block that stops midway reruns whole
            grads = GradientProbe(model, measured) if step.direction is Direction.BACKWARD else None
            energy = OutputEnergy(model, measured)
            run_batches(ctx, stage, step, folders, outputs, probe, grads, energy)  # run the batches
            rows[number] = (measure_stage(model, stage, infos, probe, grads, formats, reasons, energy)
                            if step.measure else [])
        finally:
            unload(model, stage.resident)  # off-load it
        store.commit(number, rows[number], outputs, folders.target, folders.consumed)
    ordered = _in_module_order(rows, infos)
    if context:
        fmt, names = context_modules(formats, ordered, lm_head)
        result = streamed_restore_gains(path, calibration, names, fmt, context_error=True,
                                        options=replace(options, scratch=store.folder))
        meta["context"] = fill_context(ordered, fmt, result)
    table = SensitivityTable(pd.DataFrame(ordered), meta)
    if out_dir:
        table.save(out_dir)
    store.remove()
    if scratch:
        scratch.cleanup()
    return table


def _in_module_order(rows: dict[int, list[dict]], infos) -> list[dict]:
    """All stages' rows in module-tree order, as analyze() lists them."""
    by_name: dict[str, list[dict]] = {}
    for stage_rows in rows.values():
        for row in stage_rows:
            by_name.setdefault(row["name"], []).append(row)
    return [row for info in infos for row in by_name[info.name]]


@dataclass(frozen=True)
class BatchShape:
    """The largest calibration batch a stage sees: language tokens and sequences, vision patches and images."""

    tokens: int
    sequences: int
    patches: int = 0
    images: int = 0

    @classmethod
    def of(cls, calibration, batch_size: int, vision_config=None) -> BatchShape:
        """From the calibration itself (image batches are processed once to count their tokens and patches)."""
        seq_len = getattr(calibration, "meta", {}).get("seq_len")
        if seq_len:
            return cls(batch_size * seq_len, batch_size)
        shapes = [cls(int(b["input_ids"].numel()), int(b["input_ids"].shape[0]), _patches(b, vision_config),
                      _images(b)) for b in calibration.batches(batch_size)]
        return cls(*(max(getattr(s, f) for s in shapes) for f in ("tokens", "sequences", "patches", "images")))


def _patches(batch: dict, vision_config) -> int:
    """Vision tokens of a batch: pixel values over the values one patch holds."""
    pixels = batch.get("pixel_values")
    if pixels is None or vision_config is None:
        return 0
    per_patch = (getattr(vision_config, "in_channels", None) or getattr(vision_config, "num_channels", 3)) * (
        getattr(vision_config, "patch_size", 1) ** 2) * getattr(vision_config, "temporal_patch_size", 1)
    return pixels.numel() // per_patch


def _images(batch: dict) -> int:
    grid = batch.get("image_grid_thw")
    pixels = batch.get("pixel_values")
    return int(grid.shape[0]) if grid is not None else int(pixels.shape[0]) if pixels is not None else 0


def streaming_need(path, formats, *, dtype: torch.dtype = torch.bfloat16, batch_size: int = 4, seq_len: int = 256,
                   fisher: bool = True, device: str | torch.device = "cpu") -> tuple[dict, str]:
    """(need, label) of the largest stage of a streamed analysis of ``path``, from its config alone.

    ``need`` is :func:`analysis.stream_weights.stage_need`'s dict; a vision tower is assumed to
    see as many patches per image as the language model sees tokens per sequence. Raises
    :class:`StreamingUnsupported` for a model streaming cannot handle.
    """
    model = skeleton(path, dtype)
    infos = list_modules(model)
    lm_head = output_embedding_name(model)
    candidates = [i.name for i in infos if _reason(model, i, lm_head, list(formats)) is None]
    shape = BatchShape(batch_size * seq_len, batch_size, batch_size * seq_len, batch_size)
    need, stage = _largest_need(model, stages_of(model, infos, lm_head), candidates, shape, fisher,
                                torch.device(device).type)
    return need, stage.label


def _largest_need(model, stages: list[Stage], candidates, shape: BatchShape, fisher: bool,
                  device_type: str = "cpu"):
    """(need, stage) of the stage that needs the most memory on a ``device_type`` device."""
    needs = []
    for s in stages:
        vision = s.kind in VISION_KINDS
        tokens, sequences = (shape.patches, max(shape.images, 1)) if vision else (shape.tokens, shape.sequences)
        need = stage_need(model, s.resident, [n for n in s.linears if n in candidates], tokens, sequences,
                          head=s.kind is StageKind.HEAD,
                          backward=fisher and s.kind not in (StageKind.EMBED, StageKind.VISION_STEM),
                          device_type=device_type, config=stage_config(model, s))
        needs.append((need, s))
    return max(needs, key=lambda pair: pair[0]["total"])


def _check_fits(model, stages, candidates, cap: int, calibration, batch_size, fisher: bool,
                device_type: str = "cpu") -> None:
    """Refuse, naming the fix, when the largest stage cannot fit under ``max_memory``."""
    shape = BatchShape.of(calibration, batch_size, getattr(model.config, "vision_config", None))
    need, stage = _largest_need(model, stages, candidates, shape, fisher, device_type)
    if need["total"] > cap:
        raise StreamingUnsupported(
            f"--max-memory {format_bytes(cap)} is too small: streaming holds one block at a time, and the largest "
            f"({stage.label}) needs about {format_bytes(need['total'])} (weights {format_bytes(need['weights'])}, "
            f"input statistics {format_bytes(need['statistics'])}, work space {format_bytes(need['work'])}): pass "
            f"--max-memory {cap_above(need['total'])} or more, or a smaller --batch-size (the cap leaves out about "
            f"{format_bytes(need['runtime'])} of runtime buffers and ~0.5 GB of Python and libraries)")
