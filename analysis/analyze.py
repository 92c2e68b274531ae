"""analyze(): run calibration data through a model and measure every module in every format.

The loop is the algorithm of the README: hook the candidate Linears, run the calibration
batches once (statistics stream into each hook), then round each weight through
bitsandbytes per format and read its weight and output error off the statistics. Partial
statistics are flushed to ``<out>/partial/`` every few minutes and whenever the pass is
interrupted, so ``resume=True`` continues where it stopped.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from quantplan.common.batches import batch_to, model_device, without_labels
from quantplan.common.heap import release_if_grown
from quantplan.common.profile import stage

from .attention import attention_config
from .checkpoint_names import checkpoint_prefixes
from .distributed import Shard
from .endtoend import restore_gains
from .equalize import Equalization, apply_equalization, mean_abs_exponent, measure_equalization
from .fisher import GradientProbe, fisher_weights, loss_backward
from .fisher_windows import BackwardShare, backward_share
from .formats import NF4, format_to_dict
from .head_chunks import base_hidden
from .interrupts import DeferredInterrupt, InterruptNow
from .kept_hidden import KeptHidden
from .measure import measure_module
from .memory import non_module_bytes
from .micro_batches import activation_budget, sequences_per_micro_batch, splittable
from .modules import (
    bare_matrices,
    check_something_to_quantize,
    list_modules,
    not_quantizable_reason,
    output_embedding_name,
    refuse_quantized,
    warn_bare_matrices,
)
from .output_energy import OutputEnergy
from .packed import PackedWeights
from .partial_state import announce_partial_size, extra_state, resume_state, saved_equalization, stop_note
from .probe import InputProbe
from .reference import KLReference
from .simulate import QuantCache
from .stream_head import chunked_loss_backward, plain_head
from .table import SensitivityTable

PARTIAL_DIR = "partial"
CONTEXT_COLUMNS = ("restore_gain", "context_output_rel_error")


def analyze(model, calibration, formats=(NF4,), *, model_id: str | None = None,
            model_fingerprint: str | None = None, batch_size: int = 4, out_dir: str | Path | None = None,
            resume: bool = False, checkpoint_seconds: float = 300.0, progress: bool = True,
            fisher: bool = False, context: bool = False, packed: PackedWeights | None = None,
            hidden: KeptHidden | None = None, equalize: bool = False,
            fisher_samples: int | None = None) -> SensitivityTable:
    """Measure weight and output error of every candidate module for each format.

    ``calibration`` is a :class:`~analysis.calibration.CalibrationSet` (or anything with
    ``batches(batch_size)``, ``num_batches(batch_size)`` and ``meta``). With ``out_dir`` the
    table is saved there; ``resume`` continues from ``out_dir/partial`` after an interruption.
    ``fisher`` adds a backward pass of the next-token loss on the first batches, those holding ``fisher_samples``
    calibration windows (None: a quarter of them, at least 8; the set's size or more: every batch), and fills
    ``output_fisher_error`` (see :mod:`analysis.fisher`); the other batches run forward only, for the input statistics
    (:mod:`analysis.fisher_windows`). Under torchrun / accelerate launch
    the batches are shared by the processes and rank 0 writes the table (:mod:`analysis.distributed`).
    ``context`` adds a forward and backward pass of the all-4-bit model (first 4-bit format)
    against the 16-bit logits and fills ``restore_gain`` and ``context_output_rel_error`` for
    that format (see :mod:`analysis.endtoend`). ``packed``: a :class:`~analysis.packed.PackedWeights` of ``model``
    that keeps the packed 4-bit weights the measurement makes, for the steps after it (a run's verification and
    scoreboard); without it they are dropped module by module. ``hidden``: a :class:`~analysis.kept_hidden.KeptHidden`
    that keeps the 16-bit last hidden states of the first calibration batches for the run's verification.
    ``equalize`` first scales the model's norm-fed and up_proj-fed input channels by powers of two, in place and
    without changing its outputs (:mod:`analysis.equalize`); the table's metadata holds the scales, which every later
    step applies to the model it loads.
    """
    formats = list(formats)
    refuse_quantized(model)
    infos = list_modules(model)
    lm_head = output_embedding_name(model)
    reasons = {i.name: _reason(model, i, lm_head, formats) for i in infos}
    check_something_to_quantize(infos, reasons, lm_head)
    warn_bare_matrices(model, infos)
    candidates = [i.name for i in infos if reasons[i.name] is None]
    fingerprint = model_fingerprint or _structure_fingerprint(model)
    shard = Shard.current()
    partial = shard.partial_folder(out_dir)
    # a resumed pass continues on the scales its statistics were summed with (applied once its state is checked)
    saved = saved_equalization(partial) if equalize and resume else None
    equalization = saved if saved is not None or not equalize else _equalized(
        model, calibration, batch_size, candidates, lm_head, [f for f in formats if f.bits == 4], shard)
    share = backward_share(calibration, batch_size, fisher_samples) if fisher else BackwardShare(0, 0)
    run_meta = {"model_fingerprint": fingerprint, "calibration": calibration.meta,
                "formats": [format_to_dict(f) for f in formats], "batch_size": batch_size, "candidates": candidates,
                "fisher": fisher, "fisher_batches": share.batches,
                "equalization": equalization.fingerprint() if equalization else None,
                **({"equalization_scales": equalization.to_dict()} if equalization else {})}

    probe = InputProbe(model, candidates)
    grads = GradientProbe(model, candidates) if fisher else None
    energy = OutputEnergy(model, [n for n in candidates if n != lm_head])  # as streamed: no head logits there
    if partial:
        sample_rows = min(probe.sample_rows, batch_size * calibration.meta.get("seq_len", probe.sample_rows))
        announce_partial_size([i for i in infos if i.name in set(candidates)], sample_rows, fisher, partial)
    if resume:
        resume_state(probe, grads, partial, run_meta, energy, calibration.num_batches(batch_size))
    if saved is not None:
        apply_equalization(model, saved)
    with stage("calibration pass"):
        _run_calibration(model, shard.calibration(calibration), probe, grads, batch_size, partial, run_meta,
                         checkpoint_seconds, progress, lm_head if lm_head in candidates else None, energy=energy,
                         backward_batches=share.batches,
                         hidden=hidden.attached(model, calibration, batch_size) if hidden else None)
        shard.reduce(probe, grads, energy)

    measured = {}
    weights = dict(model.named_parameters(remove_duplicate=False))
    with stage("measure"):
        for position, info in tqdm(shard.mine(infos), desc="measure modules", disable=not progress, leave=False):
            stats = probe.stats_for(info.name) if info.name in probe.owner else None
            grad_sq = fisher_weights(grads, info.name, info.out_features, stats, weights[info.name + ".weight"].device)
            measured[position] = measure_module(info, weights[info.name + ".weight"], stats, formats,
                                                reasons[info.name], grad_sq, energy.reference(info.name, stats),
                                                packed)
            release_if_grown()  # round-trip temporaries between the packed weights kept fragment glibc's heap
    rows = [row for module_rows in shard.gather(measured) for row in module_rows]
    for row in rows:
        row.update({c: float("nan") for c in CONTEXT_COLUMNS})
    meta = _table_meta(model, model_id, fingerprint, calibration, formats, infos, fisher)
    if fisher:
        meta["fisher_samples"] = share.windows
    if equalization is not None:  # asked for (the streamed analysis never is): the scales, or why there are none
        meta["equalization"] = equalization.to_dict()
    if context:
        if partial:  # the calibration pass is done: a resume after a failure below skips it
            probe.save(partial, run_meta, extra_state(grads, energy))
        with stage("quantized-context pass"):
            meta["context"] = _quantized_context(model, calibration, formats, rows, lm_head, batch_size, progress,
                                                 packed)
    table = SensitivityTable(pd.DataFrame(rows), meta)
    if out_dir:
        if shard.rank == 0:
            table.save(out_dir)
        shard.remove_partial(partial)
    return table


def _quantized_context(model, calibration, formats, rows, lm_head, batch_size, progress, packed=None) -> dict:
    """Fill the quantized-context columns of the first 4-bit format's rows; return what was measured."""
    fmt, names = context_modules(formats, rows, lm_head)
    reference = KLReference(model, calibration, batch_size, progress=progress)
    result = restore_gains(model, reference, QuantCache(model, fmt, packed), names, context_error=True,
                           progress=progress)
    return fill_context(rows, fmt, result)


def context_modules(formats, rows, lm_head) -> tuple:
    """(the first 4-bit format, the modules the quantized-context pass rounds to it: every supported one but lm_head);
    refused, naming the fix, without a 4-bit format."""
    fmt = next((f for f in formats if f.bits == 4), None)
    if fmt is None:
        raise ValueError("the quantized-context pass needs a 4-bit format: add nf4 to --formats, or drop --context")
    return fmt, [r["name"] for r in rows if r["format"] == fmt.name and r["supported"] and r["name"] != lm_head]


def fill_context(rows, fmt, result) -> dict:
    """Write a quantized-context pass's gains and output errors (a :class:`~analysis.endtoend.RestoreGains`) into
    ``fmt``'s rows; returns the table's ``meta["context"]``."""
    for row in rows:
        if row["format"] == fmt.name and row["name"] in result.gains:
            row["restore_gain"] = result.gains[row["name"]]
            row["context_output_rel_error"] = result.context_error[row["name"]]
    return {"format": fmt.name, "all_4bit_kld": result.kld, "tokens": result.tokens}


def _reason(model, info, lm_head, formats) -> str | None:
    reason = not_quantizable_reason(info, formats)
    if reason is None and info.name == lm_head and _is_tied(model):
        reason = "lm_head is tied to the input embeddings: transformers keeps it 16-bit"
    return reason


def _is_tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _run_calibration(model, calibration, probe, grads, batch_size, partial, run_meta, checkpoint_seconds, progress,
                     measured_head: str | None, energy=None, hidden=None, backward_batches: int = 0):
    """The one pass over the calibration batches, flushing partial statistics as it goes.

    Each batch adds straight into the statistics, so a state is saved only between batches: a Ctrl-C or
    SIGTERM lets the running batch finish, then the state is saved and the interrupt raised
    (:mod:`analysis.interrupts`); an error midway (or a second Ctrl-C) keeps the last flush, which
    ``--resume`` continues from. ``hidden``: an attached :class:`~analysis.kept_hidden.KeptHidden` context, told
    where each batch starts and ends. With ``grads``, the batches numbered below ``backward_batches`` run forward and
    backward; the others forward only, without an autograd graph (:func:`_forward_step`). ``measured_head``: lm_head's
    name where it is measured.
    """
    device = model_device(model)
    forward = _forward_step(model, probe, measured_head, device)
    backward = _fisher_backward(model, probe, device) if grads else None
    total = calibration.num_batches(batch_size)
    last_flush = time.monotonic()
    saved = probe.batches_done  # the batches partial/ holds: a resumed state, then each flush
    grad_context = grads.attached() if grads else nullcontext()
    energy_context = energy.attached() if energy else nullcontext()
    kept_context = hidden or nullcontext()
    no_grad = nullcontext() if grads else torch.inference_mode()
    forward_only = torch.no_grad if grads else nullcontext
    stop = DeferredInterrupt(enabled=bool(partial))  # without an output folder there is nothing to wait and save for
    try:
        with probe.attached(), grad_context, energy_context, kept_context as kept, no_grad, stop:
            bar = tqdm(total=total, initial=probe.batches_done, desc="calibration batches", disable=not progress)
            for position, (index, batch) in enumerate(_numbered_batches(calibration, batch_size)):
                if position < probe.batches_done:
                    continue
                stop.check()
                backward_pass = grads is not None and index < backward_batches
                probe.start_batch(batch["input_ids"].numel() if backward_pass and splittable(batch) else None)
                if energy:
                    energy.start_batch()
                if kept:
                    kept.start_batch(index)
                if backward_pass:
                    grads.start_batch()
                    backward(model, batch, device, seed=index)
                    grads.commit_batch()
                else:
                    with forward_only():
                        forward(batch)
                if energy:
                    energy.commit_batch()
                if kept:
                    kept.commit_batch()
                probe.commit_batch()
                bar.update(1)
                if partial and time.monotonic() - last_flush > checkpoint_seconds:
                    probe.save(partial, run_meta, extra_state(grads, energy))
                    saved, last_flush = probe.batches_done, time.monotonic()
            stop.check()
            bar.close()
    except BaseException as err:
        if partial and not probe.in_batch and not isinstance(err, InterruptNow) and probe.batches_done > saved:
            probe.save(partial, run_meta, extra_state(grads, energy))
            saved = probe.batches_done
        note = stop_note(probe, saved, total, partial, err)
        if isinstance(err, KeyboardInterrupt):  # the caller prints it once (quantplan.cli)
            raise KeyboardInterrupt(note) from err
        if partial and saved:
            print(f"quantplan: {note} ({type(err).__name__})")
        raise


def _forward_step(model, probe, measured_head: str | None, device):
    """How a batch runs forward only, its ``labels`` dropped (no loss is made). Where lm_head is measured and plain
    (:func:`~analysis.stream_head.plain_head`), the base model's last hidden state goes to the probe as lm_head's input
    and no logits are made: no batch × vocabulary tensor, as in the Fisher pass's head chunks. Otherwise the model's
    forward, its head on the last position only unless lm_head is measured."""
    if measured_head is not None and plain_head(model):
        return lambda batch: probe.observe(measured_head, base_hidden(model, without_labels(batch)))
    extra = _forward_options(model, full_logits=measured_head is not None)
    return lambda batch: model(**batch_to(without_labels(batch), device), **extra)


def _numbered_batches(calibration, batch_size):
    """(batch index in the whole set, batch): a process's share keeps the global index (Fisher seeds)."""
    if hasattr(calibration, "numbered_batches"):
        return calibration.numbered_batches(batch_size)
    return enumerate(calibration.batches(batch_size))


def _fisher_backward(model, probe, device):
    """The Fisher pass's backward step: the head in token chunks where the logits are plain (no batch × vocabulary
    tensor: :func:`analysis.stream_head.chunked_loss_backward`), a text batch a few sequences at a time so their saved
    activations fit :func:`analysis.micro_batches.activation_budget`; else the whole-batch loss."""
    if not plain_head(model):
        return loss_backward
    text = model.config.get_text_config()

    def backward(model, batch, device, seed):  # the budget read each batch: the first one allocates the statistics
        sequences = (sequences_per_micro_batch(text, batch["input_ids"].shape[-1], activation_budget(device))
                     if splittable(batch) else None)
        chunked_loss_backward(model, batch, device, probe, seed, sequences)

    return backward


def _equalized(model, calibration, batch_size: int, candidates: list[str], lm_head: str | None,
               formats: list, shard: Shard) -> Equalization:
    """Scale ``model`` in place (:func:`analysis.equalize.measure_equalization`) from its first calibration batch, and
    say in one line what moved. Under torchrun every process takes rank 0's scales."""
    if lm_head is None:
        return Equalization(note="the model has no output head to check the scales' outputs on")
    if not formats:
        return Equalization(note="no 4-bit format is measured")
    with stage("equalize"):
        _, batch = next(iter(_numbered_batches(calibration, batch_size)))
        batch = without_labels(batch)
        extra, device = _forward_options(model, full_logits=False), model_device(model)
        full = _forward_options(model, full_logits=True)  # the check compares every position the head reads
        with torch.inference_mode(False), torch.no_grad():
            equalization = measure_equalization(model, batch, set(candidates),
                                                lambda m, b: m(**batch_to(b, device), **extra), formats,
                                                check_forward=lambda m, b: m(**batch_to(b, device), **full))
            chosen = Equalization.from_dict(shard.agree(equalization.to_dict()))
            if chosen != equalization:  # another process decided: its scales, on every process
                apply_equalization(model, equalization, inverse=True)
                apply_equalization(model, chosen)
                equalization = chosen
    if equalization:
        print(f"quantplan: equalized {len(equalization.groups)} shared inputs (power-of-two channel scales, "
              f"mean |log2| {mean_abs_exponent(equalization):.2f}); the 16-bit outputs are unchanged")
    else:
        print(f"quantplan: no channel scales: {equalization.note}")
    return equalization


def _forward_options(model, full_logits: bool) -> dict:
    params = inspect.signature(model.forward).parameters
    options = {}
    if "use_cache" in params:
        options["use_cache"] = False
    if "logits_to_keep" in params and not full_logits:
        options["logits_to_keep"] = 1  # lm_head is not measured: skip its large matmul
    return options


def _table_meta(model, model_id, fingerprint, calibration, formats, infos, fisher) -> dict:
    import bitsandbytes
    import transformers

    other = non_module_bytes(model, [i.name for i in infos if i.is_linear])
    dtype = next(model.parameters()).dtype
    return {
        "model_id": model_id or getattr(model.config, "name_or_path", "") or type(model).__name__,
        "model_fingerprint": fingerprint,
        "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
        "dtype": str(dtype).removeprefix("torch."),
        "calibration": calibration.meta,
        "calibration_fingerprint": calibration.meta["fingerprint"],
        "formats": [format_to_dict(f) for f in formats],
        "fisher": fisher,
        "other_bytes": other["storage"],
        "other_footprint_bytes": other["footprint"],
        "tied_lm_head": _is_tied(model),
        "attention": attention_config(model.config),  # the KV-cache model of --kv-context (planner.kv_cache)
        "checkpoint_prefixes": checkpoint_prefixes(model, [i.name for i in infos if i.is_linear]),
        "bare_matrices": bare_matrices(model, infos),  # 16-bit in every plan, in other_bytes
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _structure_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}".encode())
        digest.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return "structure:" + digest.hexdigest()[:16]
