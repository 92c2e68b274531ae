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


def fisher_batches(calibration, batch_size: int, fisher_samples: int | None) -> int:
    """How many leading batches hold the first ``fisher_samples`` windows (the last of them may hold more; None: all
    the batches)."""
    sizes = batch_windows(calibration, batch_size)
    if fisher_samples is None:
        return len(sizes)
    check_fisher_samples(fisher_samples)
    covered = 0
    for count, size in enumerate(sizes, start=1):
        covered += size
        if covered >= fisher_samples:
            return count
    return len(sizes)


def fisher_windows(calibration, batch_size: int, backward_batches: int) -> int:
    """The windows the first ``backward_batches`` batches hold (a table's ``fisher_samples``)."""
    return sum(batch_windows(calibration, batch_size)[:backward_batches])


def check_fisher_samples(fisher_samples: int | None) -> None:
    """Refuse a window count below one, naming the fix."""
    if fisher_samples is not None and fisher_samples < 1:
        raise ValueError(f"--fisher-samples {fisher_samples}: give at least 1 calibration window (or leave it out: "
                         "a quarter of --samples, at least 8)")


#: what a resume refused for another number of Fisher windows adds to its message
RESUME_HINT = (" (the same --fisher-samples as before: a pass saved before that option existed backpropagated every "
               "window, which --fisher-samples N with N at least --samples repeats)")


def saved_backward_batches(state: dict, total_batches: int) -> int:
    """The backward batches a saved partial state was summed with; a state saved before they were recorded ran every
    batch backward when it had Fisher scores, none without."""
    if "fisher_batches" in state:
        return state["fisher_batches"]
    return total_batches if state.get("fisher") else 0
