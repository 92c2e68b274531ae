"""Which calibration batches the Fisher pass backpropagates: those holding the first ``fisher_samples`` windows.

The mean squared gradient per output channel (:mod:`analysis.fisher`) is one number per channel and settles on
fewer tokens than the Gram matrices, one matrix per input; the backward pass is two thirds of the Fisher pass. So the
first batches run forward and backward, the others forward only, for the input statistics
(:func:`analysis.analyze.analyze`, :func:`analysis.streaming.analyze_streaming`). benchmarks/README.md ("Fisher on
fewer windows") measures what that does to the plans. Batches are counted as the calibration set makes them: an
image set splits a batch where the processed shapes differ, so its batches may hold fewer windows than
``--batch-size``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: unless told, the Fisher pass backpropagates this share of the calibration windows, and at least
#: FISHER_MIN_WINDOWS of them (every window of a smaller set)
FISHER_SHARE = 4
FISHER_MIN_WINDOWS = 8


@dataclass(frozen=True)
class BackwardShare:
    """The leading calibration batches the Fisher pass backpropagates, and the windows they hold."""

    batches: int
    windows: int


def default_windows(samples: int) -> int:
    """The windows backpropagated unless ``--fisher-samples`` says: a quarter of the set's ``samples`` windows (text
    windows, or image + prompt pairs, which may be fewer than ``--samples``), at least 8."""
    return min(samples, max(FISHER_MIN_WINDOWS, samples // FISHER_SHARE))


def backward_share(calibration, batch_size: int, fisher_samples: int | None) -> BackwardShare:
    """The leading batches holding the first ``fisher_samples`` windows (the last of them may hold more; None:
    :func:`default_windows` of the set's windows; the set's size or more: every batch)."""
    sizes = batch_windows(calibration, batch_size)
    wanted = default_windows(sum(sizes)) if fisher_samples is None else fisher_samples
    check_fisher_samples(wanted)
    covered = 0
    for count, size in enumerate(sizes, start=1):
        covered += size
        if covered >= wanted:
            return BackwardShare(count, covered)
    return BackwardShare(len(sizes), covered)


def batch_windows(calibration, batch_size: int) -> list[int]:
    """The calibration windows (text windows, image + prompt pairs) in each batch, in order."""
    if hasattr(calibration, "batch_windows"):
        return calibration.batch_windows(batch_size)
    count = calibration.num_batches(batch_size)  # any set with batches() and meta: full batches, the last one short
    sizes = [batch_size] * count
    total = calibration.meta.get("samples")
    if count and total is not None:
        sizes[-1] = total - batch_size * (count - 1)
    return sizes


def check_fisher_samples(fisher_samples: int | None) -> None:
    """Refuse a window count below one, naming the fix."""
    if fisher_samples is not None and fisher_samples < 1:
        raise ValueError(f"--fisher-samples {fisher_samples}: give at least 1 calibration window (or leave it out: "
                         f"a quarter of the calibration windows, at least {FISHER_MIN_WINDOWS})")


#: what a resume refused for another number of Fisher windows adds to its message
RESUME_HINT = (" (the same --fisher-samples as before: a pass saved before that option existed backpropagated every "
               "window, which --fisher-samples N with N at least --samples repeats)")


def saved_backward_batches(state: dict, total_batches: int) -> int:
    """The backward batches a saved partial state was summed with; a state saved before they were recorded ran every
    batch backward when it had Fisher scores, none without."""
    if "fisher_batches" in state:
        return state["fisher_batches"]
    return total_batches if state.get("fisher") else 0
