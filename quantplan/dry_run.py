"""``quantplan run/analyze --dry-run``: what the job would need and do, without reading a weight.

Everything comes from the model's config (the model built on the meta device) and its
safetensors index: the estimated peak memory of the in-memory analysis (weights, the float32
Gram statistics, one (micro-)batch's activations and logits; :func:`analysis.estimate.estimate_peak`),
the all-4-bit and 16-bit checkpoint sizes, the largest block of a streamed analysis, and
whether the run would analyze in memory or stream under ``--max-memory``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from quantplan.analysis.config import AnalyzeConfig
from quantplan.analysis.estimate import (
    PeakEstimate,
    SizeEstimate,
    checkpoint_bytes,
    estimate_peak,
    estimate_sizes,
    meta_model,
)
from quantplan.analysis.models import ModelSource
from quantplan.common.sizes import cap_above, format_bytes, parse_size

GB = 1e9
AUTO = "auto"
#: what a ``--max-memory`` cap does not cover: Python and the libraries (~0.5 GB) and the runtime
#: buffers (analysis.stream_weights.RUNTIME_BYTES); auto subtracts it from the available memory
UNCOVERED_BYTES = 700 * 10**6


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
    device: str = "cpu"  # where the analysis runs (and whose free memory ``available`` is)
    dtype: str = "bf16"  # what the model is analyzed in (``--dtype auto`` resolved for ``device``)
    gradient_need: int | None = None  # bytes of the streamed gradient pass' largest block (None: cannot stream)
    gradient_note: str = ""  # its largest block's name
    cap: int | None = None  # the --max-memory cap the run would stream under (None: in memory)


def dry_run(source: ModelSource, config: AnalyzeConfig) -> DryRun:
    """Estimate the job for ``source`` under ``config`` from its config and safetensors index alone."""
    formats = config.format_values()
    peak = _peak(source, config)
    four_bit = [f for f in formats if f.bits == 4]
    sizes = estimate_sizes(source.path, four_bit[0]) if four_bit else None
    stream_need, stream_note = _stream_need(source, config)
    available = available_memory(config.device)
    max_memory = config.max_memory
    if max_memory == AUTO:
        cap = auto_cap(peak.total, available, stream_need)
        max_memory = str(cap) if cap else None
    action = _action(max_memory, peak.total, available, stream_need, stream_note)
    gradient_need, gradient_note = _gradient_need(source, config) if stream_need is not None else (None, "")
    return DryRun(source.model_id, peak, sizes, checkpoint_bytes(source.path), available, stream_need, stream_note,
                  action, config.device, config.dtype, gradient_need, gradient_note,
                  parse_size(max_memory) if max_memory else None)


def auto_cap(peak: int, available: int | None, stream_need: int | None) -> int | None:
    """The ``--max-memory auto`` cap: None (in memory) when the in-memory peak fits the available memory or
    streaming cannot help; else the available memory less what the cap leaves out (Python, libraries, buffers)."""
    if available is None or peak <= available or stream_need is None:
        return None
    cap = available - UNCOVERED_BYTES
    return cap if cap >= stream_need else None


def choose_max_memory(source: ModelSource, config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with ``max_memory="auto"`` resolved from the estimate, saying so in one line when it streams."""
    if config.max_memory != AUTO:
        return config
    available = available_memory(config.device)
    if available is None:
        return replace(config, max_memory=None)
    peak = _peak(source, config).total
    if peak <= available:
        return replace(config, max_memory=None)
    need, note = _stream_need(source, config)
    cap = auto_cap(peak, available, need)
    said = f"quantplan: the in-memory analysis needs ≈ {peak / GB:.2f} GB, more than the {available / GB:.2f} GB available"
    if cap is None:
        print(f"{said}, and streaming cannot run it ({note}): analyzing in memory anyway")
        return replace(config, max_memory=None)
    print(f"{said}: streaming it one block at a time (--max-memory {cap / GB:.2f}GB)")
    return replace(config, max_memory=str(cap))


def _peak(source: ModelSource, config: AnalyzeConfig) -> PeakEstimate:
    from quantplan.analysis.models import dtype_from_name

    return estimate_peak(meta_model(source.path), config.format_values(),
                         dtype_bytes=dtype_from_name(config.dtype).itemsize, batch_size=config.batch_size,
                         seq_len=config.seq_len, fisher=config.fisher)


def _stream_need(source: ModelSource, config: AnalyzeConfig) -> tuple[int | None, str]:
    """(bytes, name) of a streamed analysis' largest block, or (None, why the model cannot be streamed)."""
    from quantplan.analysis.models import dtype_from_name
    from quantplan.analysis.stream_weights import StreamingUnsupported
    from quantplan.analysis.streaming import streaming_need

    if config.text_only and _is_vision_language(source):  # its streamed analysis needs images
        return None, "a vision-language model calibrated on text (--text-only) is analyzed in memory"
    try:
        need, label = streaming_need(source.path, config.format_values(), dtype=dtype_from_name(config.dtype),
                                     batch_size=config.batch_size, seq_len=config.seq_len, fisher=config.fisher,
                                     device=config.device)
    except StreamingUnsupported as err:
        return None, str(err)
    return need["total"], label


def _is_vision_language(source: ModelSource) -> bool:
    """Whether the source's config is a vision-language model's (read from its config alone)."""
    from transformers import AutoConfig

    from quantplan.analysis.vision import is_vision_language

    return is_vision_language(AutoConfig.from_pretrained(source.path))


def _gradient_need(source: ModelSource, config: AnalyzeConfig) -> tuple[int | None, str]:
    """(bytes, name) of the largest block of the streamed quantized-context gradient pass (``--refine``,
    ``--context``, the automatic refinement under a cap), or (None, why it cannot stream)."""
    from quantplan.analysis.models import dtype_from_name
    from quantplan.analysis.stream_gains import gradient_pass_need
    from quantplan.analysis.stream_weights import StreamingUnsupported

    try:
        return gradient_pass_need(source.path, config.format_values(), dtype=dtype_from_name(config.dtype),
                                  batch_size=config.batch_size, seq_len=config.seq_len, device=config.device)
    except StreamingUnsupported as err:
        return None, str(err)


#: streams a streamed verification carries at once: the 16-bit reference, all-4-bit and the plan (plus one
#: single-format sibling per 4-bit format of a menu), or, after a failed check, the reference and the two
#: heuristic baselines (:func:`verify_variants`)
VERIFY_VARIANTS = 3


def verify_variants(formats) -> int:
    """Streams of the streamed verification for an analysis of ``formats`` (a menu adds its single-format plans)."""
    four_bit = [f for f in formats if f.bits == 4]
    return VERIFY_VARIANTS + (len(four_bit) if len(four_bit) > 1 else 0)


def check_streamed_run_fits(source: ModelSource, config: AnalyzeConfig, *, verify: bool, compare=None,
                            gradients: bool = False) -> None:
    """Refuse a ``--max-memory`` cap the run's streamed verification, scoreboard or gradient pass could not keep,
    before the analysis spends any time (each also checks its own stage when it starts; this is the early,
    whole-run check). ``compare``: the scoreboard's :class:`reports.compare.CompareConfig`, None when the run makes
    no report; ``gradients``: the run asks for the quantized-context gradient pass (``--refine N``; ``--context``
    asks for it through ``config``). The automatic refinement is not checked here: it skips itself, saying so."""
    from quantplan.analysis.models import dtype_from_name
    from quantplan.analysis.stream_variants import variants_need

    if not config.max_memory or config.max_memory == AUTO:
        return
    cap = parse_size(config.max_memory)
    checks = []
    if verify:
        checks.append(("streamed end-to-end check", verify_variants(config.format_values()), config.batch_size,
                       config.seq_len, None))
    if compare is not None:  # 16-bit, all-4-bit, the plan, two heuristics, the random seeds; the exported checkpoint
        checks.append(("streamed fidelity scoreboard", 6 + len(compare.seed_values), compare.batch_size,
                       compare.seq_len, export_dtype(config)))
    if gradients or config.context:
        _check_gradient_pass_fits(source, config, cap)
    for what, variants, batch_size, seq_len, exported in checks:
        need, label = variants_need(source.path, config.format_values(), variants=variants, dtype=dtype_from_name(config.dtype),
                                    batch_size=batch_size, seq_len=seq_len, device=config.device,
                                    exported_dtype=exported)
        if need > cap:
            raise ValueError(f"--max-memory {format_bytes(cap)} is too small for the run's {what}: its largest block "
                             f"({label}) needs about {format_bytes(need)}: pass --max-memory {cap_above(need)} "
                             "or more, or a smaller batch size (or --no-verify / --no-compare to skip that step)")


def export_dtype(config: AnalyzeConfig):
    """The dtype ``run`` exports the checkpoint's 16-bit tensors in: the analysis dtype, bf16 for an fp32 analysis."""
    from quantplan.analysis.models import dtype_from_name

    return dtype_from_name(config.dtype if config.dtype != "fp32" else "bf16")


def _check_gradient_pass_fits(source: ModelSource, config: AnalyzeConfig, cap: int) -> None:
    """Refuse a cap too small for the streamed quantized-context gradient pass (:mod:`analysis.stream_gains`)."""
    from quantplan.analysis.models import dtype_from_name
    from quantplan.analysis.stream_gains import gradient_pass_need, gradient_refusal

    need, label = gradient_pass_need(source.path, config.format_values(), dtype=dtype_from_name(config.dtype),
                                     batch_size=config.batch_size, seq_len=config.seq_len, device=config.device)
    if need > cap:
        raise ValueError(gradient_refusal(cap, need, label))


def _action(max_memory: str | None, peak: int, available: int | None, stream_need: int | None, note: str) -> str:
    if max_memory:
        cap = parse_size(max_memory)
        if stream_need is None:
            return f"stop: --max-memory cannot stream this model ({note})"
        if stream_need > cap:
            return (f"stop before loading: --max-memory {format_bytes(cap)} is below the largest block's need "
                    f"({note}, {format_bytes(stream_need)}): pass --max-memory {cap_above(stream_need)} or more")
        return (f"analyze streamed, one block at a time under --max-memory {format_bytes(cap)} (largest block: "
                f"{note}, {format_bytes(stream_need)})")
    action = f"analyze in memory (peak ≈ {peak / GB:.2f} GB)"
    if available is not None and peak > available:
        fix = (f"pass --max-memory {cap_above(stream_need)} or more to stream it" if stream_need is not None
               else "use a machine with more memory")
        action += f", more than the {available / GB:.2f} GB available: {fix}"
    return action


def describe(result: DryRun) -> str:
    """The dry run as a few lines for the terminal."""
    p = result.peak
    lines = [f"dry run: {result.model_id} (no weights loaded)",
             f"  in-memory analysis peak ≈ {p.total / GB:.2f} GB: weights {p.weights / GB:.2f} GB "
             f"(in {result.dtype} on {result.device}) + Gram statistics "
             f"{p.statistics / GB:.2f} GB ({p.distinct_inputs} distinct Linear inputs, float32 blocks on and above the "
             f"diagonal: ≈ 0.6 × d_in² × 4 bytes each from 576 inputs wide) "
             f"+ activations and logits {p.activations / GB:.2f} GB (one micro-batch's, with Fisher scores)"]
    if result.sizes is not None:
        lines.append(f"  checkpoint: all-4-bit {result.sizes.bytes_all_4bit / GB:.3f} GB, 16-bit "
                     f"{result.sizes.bytes_16bit / GB:.3f} GB"
                     + (f" (safetensors on disk {result.on_disk / GB:.3f} GB)" if result.on_disk else ""))
    if result.stream_need is not None:
        lines.append(f"  streamed analysis: largest block {result.stream_note} needs ≈ {result.stream_need / GB:.2f} GB")
    if result.gradient_need is not None:
        line = (f"  streamed refinement (--refine, --context, the automatic refinement): largest block "
                f"{result.gradient_note} needs ≈ {result.gradient_need / GB:.2f} GB")
        if result.cap is not None and result.gradient_need > result.cap:
            line += (f", above the {result.cap / GB:.2f} GB cap: --refine / --context would be refused and the "
                     "automatic refinement skipped")
        lines.append(line)
    if result.available is not None:
        lines.append(f"  memory available now on {result.device}: {result.available / GB:.2f} GB")
    lines.append(f"  the run would {result.action}")
    return "\n".join(lines)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes free where the analysis runs: the GPU's free memory for ``cuda[:N]``, else MemAvailable from
    /proc/meminfo; None where it cannot be read."""
    if device != "cpu":
        return _device_free(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _device_free(device: str) -> int | None:
    """Free memory of a CUDA device (None without CUDA or for another kind of device)."""
    import torch

    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(target)
    return int(free)
