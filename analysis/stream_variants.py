"""Variants of a model larger than memory compared with its 16-bit self, block by block.

The end-to-end checks (the planner's never-worse verification, the fidelity scoreboard) measure
how far each variant's next-token distribution drifts from 16-bit, a variant being the 16-bit
model with some Linears swapped for bitsandbytes' round trip (:class:`analysis.simulate.QuantCache`).
In memory that runs the model once per variant from its first differing decoder layer
(:func:`analysis.reference.calibration_klds`, :mod:`analysis.shared_prefix`);
here it runs on the spine of the streamed analysis (:mod:`analysis.streaming`): the meta-device
skeleton, :class:`~analysis.stream_weights.DiskWeights`, the per-batch files of
:mod:`analysis.stream_store` and the same stages.

1. the embeddings run every batch up to the first decoder layer;
2. each decoder layer is read from disk once; for each variant, its modules in this layer are
   round-tripped, every batch of that variant's hidden states is read from disk, run through the
   layer and written back for the next; the 16-bit weights are restored before the next variant;
3. the final norm + lm_head run one batch at a time in token chunks (as
   :mod:`analysis.stream_head` does): each chunk's 16-bit logits once, then every variant's, and
   the caller compares them (KL, top token, NLL) before the next chunk.

Variants that have computed the same thing so far (same input, same modules round-tripped in
this stage: the 16-bit reference and a plan keeping the first layers, every variant in the
embeddings) share one stream of hidden states. Memory holds one block (plus the packed 4-bit
copies of its round-tripped Linears) and one batch, or at the head one batch per variant and one
chunk of logits: nothing grows with tokens × vocabulary. Disk holds two layers' hidden states per
stream. Not resumable: a killed pass starts again (it costs one forward per variant, no backward).

A variant may also be a pre-quantized checkpoint exported from the model (the plan's
``OUT/checkpoint``: :class:`~analysis.stream_checkpoint.ExportedCheckpoint`): its stream runs each
stage with the checkpoint's own tensors, every 4-bit Linear bitsandbytes' ``Linear4bit`` on the
packed bytes shipped, after the 16-bit weights of the stage are off-loaded (one or the other block
in memory); at the head its norm and lm_head sit beside the 16-bit ones, sharing the tensors saved
in the stream's dtype.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from quantplan.common.sizes import cap_above, format_bytes, parse_size

from .calibration import CalibrationSet
from .formats import FourBit
from .head_chunks import HeadChunk
from .measure import measure_work_bytes
from .modules import list_modules, output_embedding_name
from .probe import InputProbe
from .reference import Logits16, VariantKLs, batch_tokens
from .simulate import QuantCache
from .stream_checkpoint import CheckpointWeights, ExportedCheckpoint
from .stream_head import chunk_tokens, refuse_logit_transforms
from .stream_stages import final_norm, stages_of
from .stream_steps import Direction, Step, StepContext, StepFolders, run_batches
from .stream_store import read_batch
from .stream_weights import (
    DiskWeights,
    StreamingUnsupported,
    move_buffers,
    skeleton,
    stage_bytes,
    stage_need,
    unload,
)

#: the label of the 16-bit stream every variant is compared with, when the caller names none
_REFERENCE = "\0 16-bit reference"


@dataclass(frozen=True)
class StreamOptions:
    """Where and how the streamed pass runs: dtype and device of the blocks, batches, the memory cap, scratch."""

    dtype: torch.dtype = torch.bfloat16
    batch_size: int = 4
    max_batches: int | None = None
    device: str = "cpu"
    max_memory: str | int | None = None  # refused at once when the largest block cannot fit
    scratch: str | Path | None = None  # folder for the hidden states (default: the system's temporary folder)
    progress: bool = False


class FirstBatches:
    """The first ``count`` batches of a calibration set (all of them for None), always in the same order."""

    def __init__(self, calibration, batch_size: int, count: int | None):
        total = calibration.num_batches(batch_size)
        self.calibration, self.count = calibration, total if count is None else min(total, count)

    def batches(self, batch_size: int) -> Iterator[dict]:
        for index, batch in enumerate(self.calibration.batches(batch_size)):
            if index >= self.count:
                return
            yield batch


def streamed_klds(path, calibration, variants: Mapping, fmt: FourBit,
                  options: StreamOptions = StreamOptions()) -> VariantKLs:
    """Mean next-token KL from 16-bit (nats per unmasked token) of each variant of the model saved in ``path``.

    ``variants`` is what :func:`analysis.reference.calibration_klds` takes: label -> quantized module
    names, or a mapping name -> 4-bit format (None: ``fmt``), or None for the 16-bit model itself;
    the numbers are the ones it gives in memory, summed batch by batch and chunk by chunk.
    """
    totals = dict.fromkeys(variants, 0.0)
    for chunk in variant_logit_chunks(path, calibration, variants, fmt, options):
        with torch.inference_mode():
            totals[chunk.label] += float(chunk.kl_sum())
    batches = FirstBatches(calibration, options.batch_size, options.max_batches)
    tokens = sum(batch_tokens(b) for b in batches.batches(options.batch_size))
    return VariantKLs({label: total / max(tokens, 1) for label, total in totals.items()}, tokens)


@dataclass(frozen=True)
class StreamedKLs:
    """The planner's KL measurement (``variants -> VariantKLs``) for a model read block by block from ``path``."""

    path: str | Path
    calibration: object
    fmt: FourBit
    options: StreamOptions = StreamOptions()

    def __call__(self, variants: Mapping) -> VariantKLs:
        return streamed_klds(self.path, self.calibration, variants, self.fmt, self.options)


class StreamedModel(NamedTuple):
    """A model saved as safetensors, opened for a block-by-block pass (nothing loaded but its buffers)."""

    model: torch.nn.Module  # the meta-device skeleton, buffers on ``device``
    weights: DiskWeights  # its tensors, read from disk stage by stage
    lm_head: str | None  # the output embedding's module name
    stages: list  # analysis.stream_stages.Stage, in order
    device: torch.device


def without_images(calibration) -> bool:
    """Whether ``calibration`` is token windows alone (a :class:`~analysis.calibration.CalibrationSet`, not image +
    prompt pairs): a vision-language model then runs its language model alone (``stages_of(..., text_only=True)``)."""
    return isinstance(calibration, CalibrationSet)


def open_streamed(path, options: StreamOptions, text_only: bool = False) -> StreamedModel:
    """The model in ``path`` as a skeleton in ``options.dtype`` with its stages, refused (naming why) when its logits
    change after lm_head: what every block-by-block pass over variants starts from (``text_only``: a vision-language
    model's stages for batches without images, :func:`~analysis.stream_stages.stages_of`)."""
    device = torch.device(options.device)
    model = skeleton(path, options.dtype)
    move_buffers(model, device)
    lm_head = output_embedding_name(model)
    refuse_logit_transforms(model)
    return StreamedModel(model, DiskWeights(path, model), lm_head,
                         stages_of(model, list_modules(model), lm_head, text_only), device)


def variant_logit_chunks(path, calibration, variants: Mapping, fmt: FourBit,
                         options: StreamOptions = StreamOptions()) -> Iterator[HeadChunk]:
    """Every (variant, batch, token chunk) of the variants' logits beside the 16-bit ones (module docstring).

    ``calibration`` has ``batches(batch_size)`` and ``num_batches(batch_size)``; its first
    ``options.max_batches`` batches are compared. Chunks come batch by batch, then chunk by chunk,
    then variant by variant; a variant given as None yields the 16-bit logits as its own. A variant given
    as an :class:`~analysis.stream_checkpoint.ExportedCheckpoint` runs that pre-quantized checkpoint's own
    tensors, its 4-bit Linears bitsandbytes' ``Linear4bit`` (:mod:`analysis.stream_checkpoint`): a stream of
    its own, each stage run once its 16-bit weights are off-loaded, so the block in memory is one or the other.
    """
    text_only = without_images(calibration)
    calibration = FirstBatches(calibration, options.batch_size, options.max_batches)
    model, weights, lm_head, stages, device = open_streamed(path, options, text_only)
    exported = {label: CheckpointWeights(v.path, model) for label, v in variants.items()
                if isinstance(v, ExportedCheckpoint)}
    wanted = _normalized({k: v for k, v in variants.items() if k not in exported}, fmt, stages)
    if options.max_memory is not None:
        held = sum(c.held_bytes(model, stages[-1].params, options.dtype) for c in exported.values())
        _check_fits(model, stages, wanted, parse_size(options.max_memory), calibration, options, device.type,
                    exported=len(exported), exported_head=held)
    chunk = chunk_tokens(stage_bytes(model, [lm_head + ".weight"]), model.config.get_text_config().vocab_size)
    ctx = StepContext(model, calibration, options.batch_size, lm_head, chunk, device)
    scratch = tempfile.TemporaryDirectory(prefix="quantplan-variants-", dir=options.scratch)
    try:
        streams = dict.fromkeys(wanted)  # label -> folder of its hidden states (None: the batches themselves)
        own = dict.fromkeys(exported)  # an exported checkpoint's label -> its own stream's folder
        for number in tqdm(range(len(stages) - 1), desc=f"{len(variants)} variant(s), streamed blocks",
                           disable=not options.progress, leave=False):
            stage, folder = stages[number], Path(scratch.name) / f"stage-{number:04d}"
            weights.load(model, stage.resident, options.dtype, device)
            try:
                streams = _run_stage(ctx, stage, folder, wanted, streams, fmt)
            finally:
                unload(model, stage.resident)
            for i, (label, checkpoint) in enumerate(exported.items()):
                own[label] = _run_exported(ctx, stage, checkpoint, own[label], folder / f"exported-{i:03d}")
            shutil.rmtree(Path(scratch.name) / f"stage-{number - 1:04d}", ignore_errors=True)
        head = stages[-1]
        weights.load(model, head.params, options.dtype, device)
        try:
            ends = {label: (own[label], checkpoint.stage(model, head.params, device))
                    for label, checkpoint in exported.items()}
            yield from _head_chunks(ctx, head, wanted, streams, variants, fmt, ends)
        finally:
            unload(model, head.params)
    finally:
        scratch.cleanup()


def _normalized(variants: Mapping, fmt: FourBit, stages) -> dict[str, dict[str, FourBit]]:
    """label -> {module: format} (16-bit: {}), the 16-bit reference included; names the model lacks are
    left out, as :class:`~analysis.simulate.QuantCache` callers filter them; a name no stage holds is refused."""
    owned = {n for s in stages for n in s.linears}
    known = {p.rpartition(".")[0] for s in stages for p in s.params}
    wanted = {_REFERENCE: {}}
    for label, names in variants.items():
        formats = names if isinstance(names, Mapping) else dict.fromkeys(names or ())
        stray = sorted(n for n in formats if n in known and n not in owned)
        if stray:
            raise StreamingUnsupported(f"cannot round-trip {stray[:3]} block by block (not a measured module of any "
                                       f"block): run without --max-memory")
        wanted[label] = {n: f or fmt for n, f in formats.items() if n in owned}
    return wanted


def _run_stage(ctx: StepContext, stage, folder: Path, wanted: dict, streams: dict, fmt: FourBit) -> dict:
    """Run every batch of every distinct stream through ``stage``; returns label -> its output folder."""
    cache = QuantCache(ctx.model, fmt)
    owned = set(stage.linears)
    outputs: dict[tuple, Path] = {}
    result = {}
    step = Step(0, Direction.FORWARD, measure=False)
    try:
        for label, formats in wanted.items():
            mine = {n: f for n, f in formats.items() if n in owned}
            key = (streams[label], tuple(sorted(mine.items(), key=lambda item: item[0])))
            if key not in outputs:  # nothing so far tells this variant from an earlier one: share its stream
                target = folder / f"stream-{len(outputs):03d}"
                target.mkdir(parents=True)
                cache.set_quantized(list(mine), mine)
                run_batches(ctx, stage, step, StepFolders(streams[label], None, target, ()), target,
                            InputProbe(ctx.model, []), None)
                outputs[key] = target
            result[label] = outputs[key]
    finally:
        cache.set_quantized(())  # the 16-bit weights back before the block is off-loaded
    return result


def _run_exported(ctx: StepContext, stage, checkpoint: CheckpointWeights, hidden: Path | None,
                  target: Path) -> Path:
    """Run every batch of an exported checkpoint's stream through ``stage`` with the checkpoint's tensors
    (the stage's 16-bit weights off-loaded before); returns the folder of its outputs."""
    target.mkdir(parents=True)
    swap = checkpoint.stage(ctx.model, stage.resident, ctx.device)
    with swap.applied(ctx.model):
        run_batches(ctx, stage, Step(0, Direction.FORWARD, measure=False), StepFolders(hidden, None, target, ()),
                    target, InputProbe(ctx.model, []), None)
    return target


def _head_chunks(ctx: StepContext, head, wanted: dict, streams: dict, variants: Mapping,
                 fmt: FourBit, exported: Mapping | None = None) -> Iterator[HeadChunk]:
    """Norm + lm_head of each stream, batch by batch and chunk by chunk, each chunk's 16-bit logits made once
    (``exported``: an exported checkpoint's label -> (its stream's folder, the checkpoint's head as a
    :class:`~analysis.stream_checkpoint.Swap`): its norm and lm_head are the checkpoint's)."""
    model, cache = ctx.model, QuantCache(ctx.model, fmt)
    owned = set(head.linears)
    head_formats = {label: {n: f for n, f in formats.items() if n in owned} for label, formats in wanted.items()}
    reference = streams[_REFERENCE]
    try:
        for index, batch in enumerate(ctx.calibration.batches(ctx.batch_size)):
            flat, shape = {}, None
            with torch.inference_mode():
                for folder in dict.fromkeys(streams.values()):
                    hidden, _ = read_batch(folder, index, ctx.device)
                    shape = tuple(hidden.shape[:2])
                    flat[folder] = final_norm(model)(hidden).reshape(-1, hidden.shape[-1])
                ends = {label: _exported_end(model, ctx, folder, swap, index)
                        for label, (folder, swap) in (exported or {}).items()}
            for start in range(0, shape[0] * shape[1], ctx.head_chunk):
                rows = slice(start, start + ctx.head_chunk)
                cache.set_quantized(())
                with torch.inference_mode():
                    logits16 = Logits16(model.lm_head(flat[reference][rows]))
                for label in variants:
                    if variants[label] is None:
                        logits = logits16.logits
                    elif label in ends:
                        with torch.inference_mode():
                            logits = ends[label][0](ends[label][1][rows])
                    else:
                        cache.set_quantized(list(head_formats[label]), head_formats[label])
                        with torch.inference_mode():
                            logits = model.lm_head(flat[streams[label]][rows])
                    yield HeadChunk(label, index, batch, rows, shape, logits16, logits)
            del flat, ends
    finally:
        cache.set_quantized(())


def _exported_end(model, ctx: StepContext, folder: Path, swap, index: int):
    """(the checkpoint's lm_head, its normed hidden states of batch ``index``, flat) for an exported stream."""
    hidden, _ = read_batch(folder, index, ctx.device)
    with swap.applied(model):
        flat = final_norm(model)(hidden).reshape(-1, hidden.shape[-1])
    return swap.linear(ctx.lm_head), flat


def _check_fits(model, stages, wanted: dict, cap: int, calibration, options: StreamOptions, device_type: str,
                exported: int = 0, exported_head: int = 0) -> None:
    """Refuse, naming the fix, when a block, its round trips and one batch per stream cannot fit under ``cap``
    (``exported``: streams of exported checkpoints; ``exported_head``: bytes their heads hold beside the 16-bit one)."""
    first = next(iter(calibration.batches(options.batch_size)), {"input_ids": torch.zeros(0, 0)})
    tokens = options.batch_size * first["input_ids"].shape[-1]
    quantized = {n for formats in wanted.values() for n in formats}
    menu = {f for formats in wanted.values() for f in formats.values()}
    worst, label = _largest_need(model, stages, quantized, len(wanted) + exported, tokens, options.batch_size,
                                 device_type, formats=max(len(menu), 1), exported_head=exported_head)
    if worst > cap:
        raise StreamingUnsupported(
            f"--max-memory {format_bytes(cap)} is too small for the streamed end-to-end check: its largest block "
            f"({label}) needs about {format_bytes(worst)}: pass --max-memory {cap_above(worst)} or more, or a "
            f"smaller --batch-size")


def variants_need(path, formats, *, variants: int, dtype: torch.dtype = torch.bfloat16, batch_size: int = 4,
                  seq_len: int = 256, device: str | torch.device = "cpu",
                  exported_dtype: torch.dtype | None = None) -> tuple[int, str]:
    """(bytes, label) of the largest block a streamed comparison of ``variants`` variants holds, from the config
    alone (every Linear that ``formats`` can quantize counted as quantized: an upper bound), so that a run can
    refuse a cap its verification or scoreboard would refuse before its analysis spends any time
    (``exported_dtype``: one of the variants is the checkpoint exported in that dtype, :func:`_exported_head`)."""
    from .analyze import _reason

    model = skeleton(path, dtype)
    infos, lm_head = list_modules(model), output_embedding_name(model)
    stages = stages_of(model, infos, lm_head)
    quantized = {i.name for i in infos if _reason(model, i, lm_head, list(formats)) is None}
    return _largest_need(model, stages, quantized, variants, batch_size * seq_len, batch_size,
                         torch.device(device).type, formats=len(list(formats)),
                         exported_head=_exported_head(model, stages[-1].params, lm_head, dtype, exported_dtype))


def _exported_head(model, names: list[str], lm_head: str, dtype: torch.dtype, exported: torch.dtype | None) -> int:
    """Most bytes an exported checkpoint's head holds beside the 16-bit one, before it is written
    (:meth:`~analysis.stream_checkpoint.CheckpointWeights.held_bytes` once it is): an untied lm_head may be 4-bit
    (its packed weight, half a byte a weight); every tensor saved in another dtype than the stream's is a copy."""
    if exported is None:
        return 0
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = params[lm_head + ".weight"] is model.get_input_embeddings().weight  # a tied lm_head stays 16-bit
    total = 0
    for name in names:
        copy = 0 if exported == dtype else params[name].numel() * exported.itemsize
        total += max(copy, params[name].numel() // 2) if name == lm_head + ".weight" and not tied else copy
    return total


def _largest_need(model, stages, quantized: set, variants: int, tokens: int, batch_size: int,
                  device_type: str, formats: int = 1, exported_head: int = 0) -> tuple[int, str]:
    """(bytes, label) of the stage that holds the most: its weights, the packed 4-bit copies of its quantized
    Linears (one per format) and the de-quantized copy of the one that runs (:meth:`QuantCache.set_quantized`), and
    the work space (the bitsandbytes round trip of its largest quantized Linear, or one batch's activations) and,
    at the head, one batch of normed hidden states per variant and one chunk's comparison (about the head's
    weight bytes: :func:`analysis.stream_head.chunk_tokens`). Nothing is measured here: unlike the analysis'
    :func:`stage_need`, no input statistics and no description of the stage's other weights. An exported
    checkpoint's stream runs a stage once its 16-bit weights are off-loaded (its own tensors, 16-bit or packed, are
    no more than them and its Linear4bit de-quantizes one weight at a time: within the above), but at the head it
    holds its norm and lm_head beside the 16-bit ones where they differ: ``exported_head`` bytes."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", 0)
    params = dict(model.named_parameters(remove_duplicate=False))
    worst, label = 0, ""
    for stage in stages:
        head = stage.kind == "head"
        mine = [n for n in stage.linears if n in quantized]
        weights = stage_bytes(model, stage.params)
        packed = stage_bytes(model, [n + ".weight" for n in mine]) // 4 * formats  # per (module, format)
        restored = max((stage_bytes(model, [n + ".weight"]) for n in mine), default=0)  # one alive at a time
        roundtrip = max((measure_work_bytes(params[n + ".weight"].numel(), device_type) for n in mine), default=0)
        activations = stage_need(model, [], [], tokens, batch_size, head=head, device_type=device_type)["work"]
        total = weights + restored + packed + max(roundtrip, activations)
        if head:
            total += variants * tokens * hidden * 4 + weights + exported_head
        if total > worst:
            worst, label = total, stage.label
    return worst, label
