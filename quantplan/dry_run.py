"""``quantplan run/analyze --dry-run``: what the job would need and do, without reading a weight.

Everything comes from the model's config (the model built on the meta device) and its
safetensors index: the estimated peak memory of the in-memory analysis (weights, the float32
Gram statistics, one batch's activations and logits; :func:`analysis.estimate.estimate_peak`),
the all-4-bit and 16-bit checkpoint sizes, the largest block of a streamed analysis, and
whether the run would analyze in memory or stream under ``--max-memory``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.estimate import (
    PeakEstimate,
    SizeEstimate,
    checkpoint_bytes,
    estimate_peak,
    estimate_sizes,
    meta_model,
)
from quantplan.common.sizes import parse_size

GB = 1e9


@dataclass(frozen=True)
class DryRun:
    """The estimates behind a dry run and the sentence saying what the run would do."""

    model_id: str
    peak: PeakEstimate
    sizes: SizeEstimate | None  # None without a 4-bit candidate format
    on_disk: int | None  # safetensors bytes (None: no safetensors files)
    available: int | None  # memory available now (None: unknown)
    stream_need: int | None  # bytes of the largest stage of a streamed analysis (None: cannot stream)
    stream_note: str  # the largest stage's name, or why the model cannot be streamed
    action: str


def dry_run(model_spec: str | None, config: AnalyzeConfig) -> DryRun:
    """Estimate the job for ``model_spec`` under ``config`` from its config and safetensors index alone."""
    from quantplan.analysis import resolve_source
    from quantplan.analysis.models import dtype_from_name
    from quantplan.analysis.stream_weights import StreamingUnsupported
    from quantplan.analysis.streaming import streaming_need

    source = resolve_source(model_spec)
    formats = config.format_values()
    dtype = dtype_from_name(config.dtype)
    peak = estimate_peak(meta_model(source.path), formats, dtype_bytes=dtype.itemsize, batch_size=config.batch_size,
                         seq_len=config.seq_len, fisher=config.fisher)
    four_bit = [f for f in formats if f.bits == 4]
    sizes = estimate_sizes(source.path, four_bit[0]) if four_bit else None
    try:
        need, label = streaming_need(source.path, formats, dtype=dtype, batch_size=config.batch_size,
                                     seq_len=config.seq_len, fisher=config.fisher)
        stream_need, stream_note = need["total"], label
    except StreamingUnsupported as err:
        stream_need, stream_note = None, str(err)
    available = available_memory()
    action = _action(config.max_memory, peak.total, available, stream_need, stream_note)
    return DryRun(source.model_id, peak, sizes, checkpoint_bytes(source.path), available, stream_need, stream_note,
                  action)


def _action(max_memory: str | None, peak: int, available: int | None, stream_need: int | None, note: str) -> str:
    if max_memory:
        cap = parse_size(max_memory)
        if stream_need is None:
            return f"stop: --max-memory cannot stream this model ({note})"
        if stream_need > cap:
            return (f"stop before loading: --max-memory {cap / GB:.2f} GB is below the largest block's need "
                    f"({note}, {stream_need / GB:.2f} GB)")
        return (f"analyze streamed, one block at a time under --max-memory {cap / GB:.2f} GB (largest block: "
                f"{note}, {stream_need / GB:.2f} GB)")
    action = f"analyze in memory (peak ≈ {peak / GB:.2f} GB)"
    if available is not None and peak > available:
        fix = (f"pass --max-memory {stream_need / GB + 0.01:.2f}GB or more to stream it" if stream_need is not None
               else "use a machine with more memory")
        action += f", more than the {available / GB:.2f} GB available: {fix}"
    return action


def describe(result: DryRun) -> str:
    """The dry run as a few lines for the terminal."""
    p = result.peak
    lines = [f"dry run: {result.model_id} (no weights loaded)",
             f"  in-memory analysis peak ≈ {p.total / GB:.2f} GB: weights {p.weights / GB:.2f} GB + Gram statistics "
             f"{p.statistics / GB:.2f} GB ({p.distinct_inputs} distinct Linear inputs, 2 × d_in² × 4 bytes each) "
             f"+ one batch's activations and logits {p.activations / GB:.2f} GB"]
    if result.sizes is not None:
        lines.append(f"  checkpoint: all-4-bit {result.sizes.bytes_all_4bit / GB:.3f} GB, 16-bit "
                     f"{result.sizes.bytes_16bit / GB:.3f} GB"
                     + (f" (safetensors on disk {result.on_disk / GB:.3f} GB)" if result.on_disk else ""))
    if result.stream_need is not None:
        lines.append(f"  streamed analysis: largest block {result.stream_note} needs ≈ {result.stream_need / GB:.2f} GB")
    if result.available is not None:
        lines.append(f"  memory available now: {result.available / GB:.2f} GB")
    lines.append(f"  the run would {result.action}")
    return "\n".join(lines)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
