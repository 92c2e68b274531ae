"""What an interrupted calibration pass leaves on disk, and how ``--resume`` reads it back.

The pass (:func:`analysis.analyze._run_calibration`) flushes its statistics between batches to ``partial/``: the
input probe's Gram matrices and samples, the squared gradients and output energies (:func:`extra_state`), and the run's
metadata, channel scales included. These functions say how big that gets, what a stop left and how to go on, and check
a saved state against the run that resumes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .equalize import Equalization
from .fisher_windows import RESUME_HINT, saved_backward_batches
from .probe import partial_state_bytes
from .table import TableMismatch

LARGE_PARTIAL_BYTES = 10**9  # partial statistics at least this big are announced before the pass


def stop_note(probe, saved: int, total: int, partial: Path | None, err: BaseException) -> str:
    """What a stopped calibration pass left on disk and how to go on."""
    done = probe.batches_done
    where = f"during batch {done + 1}/{total}" if probe.in_batch else f"after {done}/{total} batches"
    if partial and saved and saved == done and not probe.in_batch:
        return (f"calibration pass stopped {where}; partial statistics saved in {partial}: re-run the same "
                "command with --resume to continue")
    why = "its statistics are already mixed into the totals" if probe.in_batch else "stopped at once"
    if partial and saved:
        return (f"calibration pass stopped {where} ({why}), so nothing new was saved: re-run the same command "
                f"with --resume to continue after batch {saved}, the last state saved in {partial}")
    why = ("no batch had finished" if done == 0 else "no output folder to save to" if not partial
           else f"{why}; no state had been saved yet")
    return f"calibration pass stopped {where}; nothing was saved ({why}): re-run the same command to start again"


def announce_partial_size(infos, sample_rows: int, fisher: bool, partial: Path) -> None:
    """Say up front how much disk the flushed partial statistics take, when that is a lot."""
    size = partial_state_bytes(infos, sample_rows, fisher)
    if size >= LARGE_PARTIAL_BYTES:
        shown = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        print(f"quantplan: the calibration pass flushes up to {shown} of partial statistics "
              f"(Gram matrices) to {partial} (twice that for a moment while a flush replaces the last one); "
              "they are removed when the analysis finishes")


def extra_state(grads, energy) -> dict:
    """The tensors saved with the probe's partial state: squared gradients and output energies."""
    return {**(grads.state() if grads else {}), **(energy.state() if energy else {})}


def resume_state(probe, grads, partial, run_meta, energy=None, total_batches: int = 0) -> None:
    """Load the partial statistics in ``partial`` into the probes, once its state is checked against ``run_meta``
    (``total_batches``: the calibration set's, for a state saved before the backward batches were recorded)."""
    if partial is None or not (partial / "state.json").is_file():
        raise FileNotFoundError(
            f"--resume found no partial results in {partial}: run without --resume to start afresh"
        )
    state, tensors = probe.load(partial)
    if grads:
        grads.load_state(tensors)
        if state.get("fisher") and not any(key.endswith("::gradran") for key in tensors):
            grads.ran |= ran_before_recorded(probe, grads.names)
    if energy:
        energy.load_state(tensors)
    state = {**state, "fisher_batches": saved_backward_batches(state, total_batches)}
    hints = {"equalization": " (--no-equalize where they were made without channel scales)",
             "fisher_batches": RESUME_HINT}
    for key in ("model_fingerprint", "calibration", "formats", "batch_size", "candidates", "fisher", "fisher_batches",
                "equalization"):
        if state.get(key) != run_meta[key]:
            raise TableMismatch(
                f"the partial results in {partial} were made with another {key.replace('_', ' ')}: "
                f"run with the same arguments as before{hints.get(key, '')}, or without --resume to start afresh"
            )
    print(f"quantplan: resuming after {probe.batches_done} calibration batches")


def saved_equalization(partial: Path | None) -> Equalization | None:
    """The channel scales an interrupted analysis saved with its partial statistics (None: none saved)."""
    state = partial / "state.json" if partial else None
    if state is None or not state.is_file():
        return None
    saved = json.loads(state.read_text()).get("equalization_scales")
    return Equalization.from_dict(saved) if saved else None


def ran_before_recorded(probe, names) -> set[str]:
    """The modules a Fisher state saved before ``GradientProbe.ran`` was recorded ran in a backpropagated batch: every
    batch ran backward then, so each one with input statistics."""
    return {n for n in names if n in probe.owner and probe.stats[probe.owner[n]].tokens > 0}
