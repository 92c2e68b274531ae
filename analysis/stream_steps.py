"""The steps of a streamed analysis: which stage runs in which direction, and how a step runs its batches.

Without Fisher scores every stage runs once, forward, and is measured there. With them the
forward steps only carry the hidden states down (the embeddings are measured on the way);
then the head turns around: its backward step computes the gradient of the sampled
next-token loss with respect to its input (:mod:`analysis.stream_head`); then each decoder
layer, from the last to the first, recomputes its forward from its stored input with
gradients on and the input and gradient probes attached (the hooks ``analyze()`` attaches to
the whole model), backpropagates the stored gradient of its output, is measured, and stores
the gradient of its input for the layer below: layer-wise activation checkpointing with the
disk as the store. A vision-language model's reverse pass goes on below the first decoder
layer: the splice stage recomputes the merger and the splice from the stored vision output and
passes the image features' gradient to the vision blocks, last to first (the stem takes none).

Gradients of values other than the hidden states travel back beside them in the gradient
files, each under the name of its value: Mllama's ``cross_attention_states`` (the projected
image features every cross-attention layer reads) collects each cross-attention layer's part,
last to first, until the splice backpropagates the sum through the projector; the gradient of a
kept local vision block's output (:mod:`analysis.stream_mllama`) goes from the splice to the
stage after that block, which seeds the gradient of its input with it, as autograd sums a
tensor's uses in memory. A LLaVA tower's blocks whose outputs its projector reads send
their gradients the same way, and the blocks after the deepest of them get none
(:mod:`analysis.stream_features`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from quantplan.common.batches import batch_to

from .analyze import CONTEXT_COLUMNS
from .fisher import GradientProbe, fisher_weights
from .measure import measure_module
from .output_energy import OutputEnergy
from .probe import InputProbe
from .stream_head import head_input_gradient, observe_head_input
from .stream_mllama import capture_global_inputs
from .stream_stages import CARRY_MARK, StageKind
from .stream_store import read_batch, write_batch
from .stream_vision import block_kwargs, capture_language_inputs, capture_vision_inputs


class Direction(Enum):
    """Which way a step runs its stage."""

    FORWARD = "forward"  # inputs -> outputs (the next stage's inputs)
    BACKWARD = "backward"  # inputs + gradients of the outputs -> gradients of the inputs (Fisher)


@dataclass(frozen=True)
class Step:
    """One stage run once over every calibration batch, in one direction, measured or not."""

    stage: int
    direction: Direction
    measure: bool


@dataclass(frozen=True)
class StepFolders:
    """Where a step reads and writes its per-batch files (:mod:`analysis.stream_store`)."""

    hidden: Path | None  # the stage's inputs (None: the embeddings make them from the batch)
    grad: Path | None  # gradients of the stage's outputs (backward steps below the head)
    target: Path | None  # what the step writes: the next stage's inputs, or the gradients of this one's
    consumed: tuple[Path, ...]  # folders no later step reads, deleted once the step is committed


def plan_steps(stages: int, fisher: bool) -> list[Step]:
    """Every stage forward and measured; with Fisher, forward unmeasured then backward from the head up."""
    forward, backward = Direction.FORWARD, Direction.BACKWARD
    if not fisher:
        return [Step(s, forward, True) for s in range(stages)]
    head = stages - 1
    return ([Step(0, forward, True)] + [Step(s, forward, False) for s in range(1, head)]
            + [Step(s, backward, True) for s in range(head, 0, -1)])


def step_folders(store, step: Step, stages: int, fisher: bool) -> StepFolders:
    """The folders ``step`` reads, writes and frees (the decoder layers' inputs stay for the backward steps)."""
    s, last = step.stage, stages - 1
    hidden = store.hidden(s) if s > 0 else None
    if step.direction is Direction.FORWARD:
        target = store.hidden(s + 1) if s < last else None
        return StepFolders(hidden, None, target, () if fisher or hidden is None else (hidden,))
    grad = store.grad(s + 1) if s < last else None
    target = store.grad(s) if s > 1 else None  # the embeddings take no gradient
    return StepFolders(hidden, grad, target, tuple(f for f in (hidden, grad) if f is not None))


@dataclass
class StepContext:
    """What every step needs besides its stage: the model, the batches, the lm_head's name and chunk, the device."""

    model: torch.nn.Module
    calibration: object
    batch_size: int
    lm_head: str | None
    head_chunk: int  # tokens per lm_head chunk (analysis.stream_head.chunk_tokens)
    device: torch.device = torch.device("cpu")  # where each block runs (its weights, one batch, its statistics)
    backward_batches: int | None = None  # the leading batches a backward step backpropagates (None: every one)


def run_batches(ctx: StepContext, stage, step: Step, folders: StepFolders, outputs: Path | None,
                probe: InputProbe, grads: GradientProbe | None, energy: OutputEnergy | None = None) -> None:
    """Run every calibration batch through ``stage`` in the step's direction with the probes attached (``energy``
    sums the measured Linears' outputs, :mod:`analysis.output_energy`, where the probe's pre-hooks see their inputs).

    A backward step backpropagates only the first ``ctx.backward_batches`` batches (analyze()'s ``fisher_samples``);
    it runs the others forward without gradients, for the input statistics, and writes no gradient for them."""
    reverse = step.direction is Direction.BACKWARD
    if stage.kind is StageKind.HEAD and not reverse and not probe.names:
        return  # lm_head is not measured (tied): nothing in this step needs the activations
    hooked = stage.kind is not StageKind.HEAD  # the head shows lm_head's input to the probe itself
    inputs = probe.attached() if hooked else nullcontext()
    outputs_seen = energy.attached() if energy and hooked else nullcontext()
    with inputs, outputs_seen, grads.attached() if grads else nullcontext(), \
            nullcontext() if reverse else torch.inference_mode():
        for index, batch in enumerate(ctx.calibration.batches(ctx.batch_size)):
            backward = reverse and (ctx.backward_batches is None or index < ctx.backward_batches)
            probe.start_batch()
            if energy:
                energy.start_batch()
            if grads:
                grads.start_batch()
            hidden, kwargs = read_batch(folders.hidden, index, ctx.device) if folders.hidden else (None, {})
            if backward:
                out, kwargs = _backward(ctx, stage, hidden, kwargs, batch, folders.grad, index, probe)
            else:
                with torch.no_grad() if reverse else nullcontext():
                    out, kwargs = _forward(ctx, stage, hidden, kwargs, batch, probe)
            if grads:
                grads.commit_batch()
            if energy:
                energy.commit_batch()
            probe.commit_batch()
            if outputs is not None and backward == reverse:  # a forward-only batch of a backward step has no gradient
                write_batch(outputs, index, out, kwargs)


def _forward(ctx: StepContext, stage, hidden, kwargs, batch, probe):
    """(the stage's output, the next stage's keyword arguments) for one batch; the head only shows the
    probe lm_head's input."""
    if stage.kind is StageKind.EMBED:
        return capture_language_inputs(ctx.model, batch_to(batch, ctx.device))
    if stage.kind is StageKind.VISION_STEM:
        return capture_vision_inputs(ctx.model, batch_to(batch, ctx.device))
    if stage.kind is StageKind.VISION_BRIDGE:
        return capture_global_inputs(ctx.model, batch_to(batch, ctx.device), hidden, kwargs)
    if stage.kind is StageKind.SPLICE:
        return _splice(ctx, batch, hidden, kwargs)
    if stage.kind is StageKind.HEAD:
        observe_head_input(ctx.model, probe, ctx.lm_head, hidden)
        return hidden, kwargs
    out = _run_block(stage, hidden, kwargs)
    return out, {**kwargs, stage.emits: out} if stage.emits else kwargs


def _splice(ctx: StepContext, batch, hidden, kwargs):
    """The first decoder layer's (hidden states, keyword arguments) from the vision tower's stored output."""
    carried = {k: v for k, v in kwargs.items() if k.startswith(CARRY_MARK)}
    return capture_language_inputs(ctx.model, batch_to(batch, ctx.device), replay=hidden, carried=carried)


def _run_block(stage, hidden, kwargs):
    """One decoder layer or vision block on its input (a vision block with its own keyword arguments)."""
    out = stage.layer(hidden, **(block_kwargs(kwargs, stage.index) if stage.kind is StageKind.VISION else kwargs))
    return out[0] if isinstance(out, tuple) else out


def _backward(ctx: StepContext, stage, hidden, kwargs, batch, grad_folder: Path | None, index: int, probe):
    """(the loss gradient of the stage's input, the other gradients carried back) for one batch (seeded per
    batch as analyze() seeds it).

    A gradient carried from above for a value this stage also uses (its input's other use:
    ``joins``; a cross-attention layer's ``cross_attention_states``) seeds that value's
    gradient before the stage's own parts add to it, in the order autograd sums them in memory
    (the later use first), so the sum is rounded as it is there. An output the loss never reached
    (no stored gradient: :mod:`analysis.stream_features`) backpropagates nothing, so its modules'
    gradient hooks never fire, as in memory.
    """
    if stage.kind is StageKind.HEAD:
        return head_input_gradient(ctx.model, probe, ctx.lm_head, hidden, seed=index, chunk=ctx.head_chunk), {}
    grad_out, carried = read_batch(grad_folder, index, ctx.device)
    leaf = hidden.detach().requires_grad_()  # as the embeddings' output is in memory, so the hooks see a graph
    leaves = {k: kwargs[k].detach().requires_grad_() for k in stage.grad_kwargs if torch.is_tensor(kwargs.get(k))}
    with torch.enable_grad():
        used = {k: v.view_as(v) for k, v in leaves.items()}  # a node whose gradient sums the seed and the uses
        seeds = [(used[k], carried.get(k)) for k in used]
        joined = carried.pop(stage.joins, None) if stage.joins else None
        inputs = leaf if joined is None else leaf.view_as(leaf)
        kwargs = {**kwargs, **used}
        if stage.kind is StageKind.SPLICE:  # the image features' gradient, back through the splice and merger
            out, made = _splice(ctx, batch, inputs, kwargs)
        elif stage.kind is StageKind.VISION_BRIDGE:
            out, made = capture_global_inputs(ctx.model, batch_to(batch, ctx.device), inputs, kwargs)
        else:
            out, made = _run_block(stage, inputs, kwargs), {}
        ends = [(made[k], carried.pop(k)) for k in list(carried) if k not in kwargs and torch.is_tensor(made.get(k))]
        pairs = [(t, g) for t, g in [*seeds, (inputs, joined), (out, grad_out), *ends]
                 if g is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    for key, value in leaves.items():  # the gradient carried back now holds this stage's part
        carried[key] = value.grad if value.grad is not None else torch.zeros_like(value)
    return leaf.grad, carried  # None: no gradient reached the input, and none goes on (stream_features)


def measure_stage(model, stage, infos, probe: InputProbe, grads: GradientProbe | None, formats,
                  reasons, energy: OutputEnergy | None = None) -> list[dict]:
    """Rows of the stage's modules, computed as analyze() computes them."""
    weights = dict(model.named_parameters(remove_duplicate=False))
    rows = []
    for info in infos:
        if info.name in stage.linears:
            stats = probe.stats_for(info.name) if info.name in probe.owner else None
            grad_sq = fisher_weights(grads, info.name, info.out_features, stats, weights[info.name + ".weight"].device)
            reference = energy.reference(info.name, stats) if energy else None
            rows.extend(measure_module(info, weights[info.name + ".weight"], stats, formats, reasons[info.name],
                                       grad_sq, reference))
    for row in rows:  # filled after the last step where asked (the streamed gradient pass: analysis.stream_gains)
        row.update({c: float("nan") for c in CONTEXT_COLUMNS})
    return rows
