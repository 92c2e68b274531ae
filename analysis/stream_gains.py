"""The quantized-context gradient pass of a model larger than memory, block by block.

:func:`analysis.endtoend.restore_gains` runs, per calibration batch, the 16-bit forward and one
forward and backward pass of KL(16-bit ‖ quantized variant) through the whole model, and folds
each quantized module's weight gradient into its gains, menu moves and output error. Here the
same numbers come from the spine of the streamed analysis (:mod:`analysis.streaming`), one block
in memory at a time:

1. forward: each block is read from disk once; the 16-bit and the quantized stream run every
   batch through it (the quantized one with the block's named modules round-tripped,
   :mod:`analysis.stream_variants`); the quantized stream's block inputs stay on disk for step 3,
   the 16-bit stream keeps only the last one;
2. head: per batch, the final norm + lm_head make each chunk of tokens' 16-bit logits and the
   quantized stream's with gradients on, and the chunk's KL sum is backpropagated to the quantized
   stream's final hidden states (and to lm_head's weight where lm_head is quantized): the gradient of
   the batch's KL / tokens with respect to the last block's output, stored on disk;
3. reverse: each block, last to first, is read again, recomputes its forward from its stored
   quantized input with its named modules round-tripped and gradients on, backpropagates the
   stored gradient of its output (:func:`analysis.stream_steps.run_batches`, the Fisher pass's
   backward step), and stores the gradient of its input for the block below; the weight-gradient
   and output-error hooks are :class:`analysis.endtoend.GainSums`', made against a
   :class:`~analysis.simulate.QuantCache` of the loaded block, so one implementation serves both passes.

Memory holds one block's weights, its round trips (packed and de-quantized), one batch and its
backward work space, at the head two batches of normed hidden states and one chunk of logits:
:func:`gradient_need`, checked against ``--max-memory`` before anything runs. Disk holds every
block's quantized inputs (as the Fisher pass does) and one level of gradients. Not resumable.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantplan.common.sizes import cap_above, format_bytes, parse_size

from .endtoend import GainSums, RestoreGains, weights_require_grad
from .formats import FourBit
from .head_chunks import head_kl_gradient
from .measure import measure_work_bytes
from .modules import list_modules, output_embedding_name
from .probe import InputProbe
from .reference import batch_tokens
from .simulate import QuantCache
from .stream_head import chunk_tokens, head_work_bytes
from .stream_stages import VISION_KINDS, StageKind, final_norm, stage_config, stages_of
from .stream_steps import Direction, Step, StepContext, StepFolders, run_batches
from .stream_store import read_batch, write_batch
from .stream_variants import (
    _REFERENCE,
    FirstBatches,
    StreamOptions,
    _normalized,
    _run_stage,
    open_streamed,
    without_images,
)
from .stream_weights import (
    DiskWeights,
    StreamingUnsupported,
    skeleton,
    stage_bytes,
    stage_need,
    unload,
)

_QUANTIZED = "\0 quantized"
_OPTIONS = StreamOptions()


def streamed_restore_gains(path, calibration, quantized, fmt: FourBit, *, formats=None, menu=None,
                           context_error: bool = False, options: StreamOptions = _OPTIONS) -> RestoreGains:
    """:func:`analysis.endtoend.restore_gains` of the model saved in ``path``, block by block (module docstring).

    ``quantized``, ``formats``, ``menu`` and ``context_error`` mean what they mean there, ``fmt`` is the
    format of a module ``formats`` does not name (the in-memory cache's); the first ``options.max_batches``
    batches of ``calibration`` are used. Refused, naming the fix, when ``options.max_memory`` is below the
    largest block's need.
    """
    text_only = without_images(calibration)
    calibration = FirstBatches(calibration, options.batch_size, options.max_batches)
    model, weights, lm_head, stages, device = open_streamed(path, options, text_only)
    sums = GainSums(quantized, formats, menu, context_error)
    wanted = _normalized({_QUANTIZED: {n: sums.formats.get(n) for n in sums.quantized}}, fmt, stages)
    refuse_unreachable(stages, wanted[_QUANTIZED])
    if options.max_memory is not None:
        check_gradient_fits(model, stages, set(wanted[_QUANTIZED]), parse_size(options.max_memory), calibration,
                            options, len({*wanted[_QUANTIZED].values(), *sums.menu.values()}) or 1)
    chunk = chunk_tokens(stage_bytes(model, [lm_head + ".weight"]), model.config.get_text_config().vocab_size)
    ctx = StepContext(model, calibration, options.batch_size, lm_head, chunk, device)
    tokens = sum(batch_tokens(b) for b in calibration.batches(options.batch_size))
    run = _Pass(ctx, weights, stages, sums, wanted, fmt, options, tokens)
    scratch = tempfile.TemporaryDirectory(prefix="quantplan-gains-", dir=options.scratch)
    try:
        run.folder = Path(scratch.name)
        inputs, streams = run.forward()
        run.reverse(inputs, run.head(streams))
    finally:
        scratch.cleanup()
    return sums.result(tokens)


@dataclass(frozen=True)
class StreamedGains:
    """The refinement's gains measurement (:data:`analysis.endtoend.GainsMeasure`) for a model read block by block
    from ``path``: :func:`streamed_restore_gains` with these options."""

    path: str | Path
    calibration: object
    fmt: FourBit
    options: StreamOptions = _OPTIONS

    def __call__(self, quantized, formats, menu) -> RestoreGains:
        return streamed_restore_gains(self.path, self.calibration, quantized, self.fmt, formats=formats, menu=menu,
                                      options=self.options)


def refuse_unreachable(stages, names) -> None:
    """The first stage only runs forward (the embeddings, a vision stem): a module there would get no gradient."""
    if early := sorted(n for n in names if n in set(stages[0].linears)):
        raise StreamingUnsupported(f"the streamed gradient pass takes no gradient into {stages[0].label} ({early[:3]}): "
                                   f"run without --max-memory")


@dataclass
class _Pass:
    """One streamed gradient pass: its model spine, the running sums and the scratch folder."""

    ctx: StepContext
    weights: DiskWeights
    stages: list
    sums: GainSums
    wanted: dict  # {16-bit reference: {}, quantized: {name: format}}
    fmt: FourBit
    options: StreamOptions
    tokens: int
    folder: Path | None = None

    def mine(self, stage) -> tuple[list[str], dict]:
        """The stage's quantized modules (in the pass's order) and their formats."""
        owned = set(stage.linears)
        names = [n for n in self.sums.quantized if n in owned]
        return names, {n: self.wanted[_QUANTIZED][n] for n in names}

    def forward(self) -> tuple[dict[int, Path | None], dict]:
        """Both streams up to the head; returns (stage -> the quantized stream's input folder, label -> the last
        block's output folder). The 16-bit stream's older folders are deleted as it goes."""
        inputs: dict[int, Path | None] = {}
        streams = dict.fromkeys(self.wanted)
        for number in tqdm(range(len(self.stages) - 1), desc="quantized-context pass, forward",
                           disable=not self.options.progress, leave=False):
            stage = self.stages[number]
            inputs[number] = streams[_QUANTIZED]
            self.weights.load(self.ctx.model, stage.resident, self.options.dtype, self.ctx.device)
            try:
                streams = _run_stage(self.ctx, stage, self.folder / f"stage-{number:04d}", self.wanted, streams,
                                     self.fmt)
            finally:
                unload(self.ctx.model, stage.resident)
            _drop_others(self.folder / f"stage-{number - 1:04d}", set(inputs.values()))
        return inputs, streams

    def head(self, streams: dict) -> Path:
        """The head's step (module docstring, 2.); returns the folder of the gradients of the last block's output."""
        model, ctx = self.ctx.model, self.ctx
        head = self.stages[-1]
        target = self.folder / f"grad-{len(self.stages) - 1:04d}"
        target.mkdir()
        self.weights.load(model, head.params, self.options.dtype, ctx.device)
        try:
            cache = QuantCache(model, self.fmt)
            names, formats = self.mine(head)
            with weights_require_grad(model, cache, self.sums.folds(cache, names)), cache.quantized(names, formats), \
                    self.sums.context_hooks(cache, names):
                weight16 = cache.original(ctx.lm_head)  # the 16-bit logits', also while lm_head is round-tripped
                for index, batch in enumerate(ctx.calibration.batches(ctx.batch_size)):
                    with self.sums.one_fold(cache, ctx.lm_head):  # a quantized head's gradient: one fold a batch
                        grad = self._head_batch(index, batch, streams, weight16)
                    write_batch(target, index, grad, {})
            self.sums.finish(cache, names)
        finally:
            unload(model, head.params)
        return target

    def _head_batch(self, index: int, batch: dict, streams: dict, weight16: torch.Tensor) -> torch.Tensor:
        """∂(KL sum / tokens)/∂(the quantized stream's last hidden states) of one batch, its logits in chunks."""
        model, ctx = self.ctx.model, self.ctx
        head = model.get_submodule(ctx.lm_head)
        with torch.no_grad():
            hidden16, _ = read_batch(streams[_REFERENCE], index, ctx.device)
            normed16 = final_norm(model)(hidden16)
        hidden, _ = read_batch(streams[_QUANTIZED], index, ctx.device)
        leaf = hidden.detach().requires_grad_()
        with torch.enable_grad():
            normed = final_norm(model)(leaf)
        grad, kl = head_kl_gradient(head, weight16, normed16, normed, batch, index, self.tokens, ctx.head_chunk)
        self.sums.total += kl
        normed.backward(grad)
        return leaf.grad

    def reverse(self, inputs: dict[int, Path | None], grad: Path) -> None:
        """Each block, last to first, backpropagates the stored gradient of its output (module docstring, 3.)."""
        model = self.ctx.model
        for number in tqdm(range(len(self.stages) - 2, 0, -1), desc="quantized-context pass, backward",
                           disable=not self.options.progress, leave=False):
            stage = self.stages[number]
            target = self.folder / f"grad-{number:04d}" if number > 1 else None  # the first stage takes none
            if target is not None:
                target.mkdir()
            self.weights.load(model, stage.resident, self.options.dtype, self.ctx.device)
            try:
                cache = QuantCache(model, self.fmt)
                names, formats = self.mine(stage)
                with weights_require_grad(model, cache, self.sums.folds(cache, names)), \
                        cache.quantized(names, formats), self.sums.context_hooks(cache, names):
                    run_batches(self.ctx, stage, Step(number, Direction.BACKWARD, measure=False),
                                StepFolders(inputs[number], grad, target, ()), target, InputProbe(model, []), None)
                self.sums.finish(cache, names)
            finally:
                unload(model, stage.resident)
            shutil.rmtree(grad, ignore_errors=True)
            if inputs[number] is not None:  # each stage's input is its own folder
                shutil.rmtree(inputs[number], ignore_errors=True)
            grad = target


def _drop_others(folder: Path, keep: set) -> None:
    """Delete the streams in ``folder`` that no later step reads (the 16-bit stream's, once passed on)."""
    if folder.is_dir():
        for stream in folder.iterdir():
            if stream not in keep:
                shutil.rmtree(stream, ignore_errors=True)


def gradient_need(model, stages, quantized: set, tokens: int, batch_size: int, device_type: str,
                  formats: int = 1, vision: tuple[int, int] | None = None) -> tuple[int, str]:
    """(bytes, label) of the stage the streamed gradient pass holds the most in: its weights, the packed 4-bit
    copies of its quantized Linears (one per format) and their de-quantized copies (all set at once), the
    larger of one round trip and the backward step's activations (:func:`analysis.stream_weights.stage_need`),
    the gradient hook's float32 copies of its largest quantized weight (the gradient, Ŵ, W and one menu step)
    and, at the head, both streams' normed hidden states and one chunk of logits with their gradient. ``vision``:
    (patches, images) of the largest batch a vision stage sees (default: as many as the language model's tokens
    and sequences)."""
    text = model.config.get_text_config()
    hidden, vocab = getattr(text, "hidden_size", 0), getattr(text, "vocab_size", 0)
    params = dict(model.named_parameters(remove_duplicate=False))
    worst, label = 0, ""
    for stage in stages:
        head = stage.kind is StageKind.HEAD
        mine = [n for n in stage.linears if n in quantized]
        largest = max((params[n + ".weight"].numel() for n in mine), default=0)
        weights = stage_bytes(model, stage.resident)
        restored = stage_bytes(model, [n + ".weight" for n in mine])
        packed = restored // 4 * formats
        roundtrip = measure_work_bytes(largest, device_type) if mine else 0
        if head:
            head_weight = stage_bytes(model, [n for n in stage.params if n.endswith(".weight") and params[n].dim() == 2])
            activations = head_work_bytes(head_weight, vocab, tokens, hidden) + 2 * tokens * hidden * 4
        else:
            seen = (vision or (tokens, batch_size)) if stage.kind in VISION_KINDS else (tokens, batch_size)
            activations = stage_need(model, [], [], seen[0], max(seen[1], 1), backward=stage is not stages[0],
                                     device_type=device_type, config=stage_config(model, stage))["work"]
        total = weights + restored + packed + max(roundtrip, activations) + largest * 4 * 4
        if total > worst:
            worst, label = total, stage.label
    return worst, label


def check_gradient_fits(model, stages, quantized: set, cap: int, calibration, options: StreamOptions,
                        formats: int = 1) -> None:
    """Refuse, naming the fix, when the streamed gradient pass's largest stage cannot fit under ``cap`` (the
    largest batch measured as the streamed analysis measures it, :class:`analysis.streaming.BatchShape`)."""
    from .streaming import BatchShape

    shape = BatchShape.of(calibration, options.batch_size, getattr(model.config, "vision_config", None))
    need, label = gradient_need(model, stages, quantized, shape.tokens, shape.sequences,
                                torch.device(options.device).type, formats, (shape.patches, shape.images))
    if need > cap:
        raise StreamingUnsupported(gradient_refusal(cap, need, label))


def gradient_refusal(cap: int, need: int, label: str) -> str:
    """The sentence refusing a cap too small for the streamed gradient pass, with the fix."""
    return (f"--max-memory {format_bytes(cap)} is too small for the streamed quantized-context gradient pass "
            f"(--context, --refine, the automatic refinement): its largest block ({label}) needs about "
            f"{format_bytes(need)}: pass --max-memory {cap_above(need)} or more, or a smaller --batch-size")


def gradient_pass_need(path, formats, *, dtype: torch.dtype = torch.bfloat16, batch_size: int = 4,
                       seq_len: int = 256, device: str | torch.device = "cpu") -> tuple[int, str]:
    """(bytes, label) of :func:`gradient_need` from the config alone, every Linear ``formats`` can quantize counted
    as quantized (an upper bound): a run refuses a cap its refinement or context pass would refuse before its
    analysis spends any time."""
    from .analyze import _reason

    model = skeleton(path, dtype)
    infos, lm_head = list_modules(model), output_embedding_name(model)
    quantized = {i.name for i in infos if _reason(model, i, lm_head, list(formats)) is None}
    return gradient_need(model, stages_of(model, infos, lm_head), quantized, batch_size * seq_len, batch_size,
                         torch.device(device).type, len([f for f in formats if getattr(f, "bits", 4) == 4]) or 1)
