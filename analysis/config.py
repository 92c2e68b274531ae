"""AnalyzeConfig: everything ``analyze`` needs besides the model, as one frozen value.

Built once (from command-line arguments or by hand) and passed whole: the calibration
source and size, the candidate formats, where and how the pass runs, and which optional
scores it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fisher_windows import check_fisher_samples
from .formats import parse_formats

#: the candidate formats when none are given: the per-module NF4 blocksize menu (``--formats nf4`` for
#: skip-list-only plans, which a pasteable BitsAndBytesConfig expresses)
DEFAULT_FORMATS = "nf4,nf4-bs32"


@dataclass(frozen=True)
class AnalyzeConfig:
    """How to measure a model: calibration, formats, device, optional scores."""

    calib: str | None = None  # file/folder/hub dataset; None: the shipped English set
    samples: int = 32  # calibration windows
    seq_len: int = 256  # tokens per window
    seed: int = 0
    formats: str | None = None  # comma list of candidate formats; None: DEFAULT_FORMATS (see format_values)
    blocksize: int = 64
    double_quant: bool = True
    device: str = "cpu"
    dtype: str = "auto"  # dtype the model is analyzed in; auto: per device (analysis.models.resolve_dtype)
    batch_size: int = 4
    resume: bool = False
    progress: bool = True
    fisher: bool = True  # Fisher-weighted scores: a backward pass on the first batches (analysis.fisher_windows)
    fisher_samples: int | None = None  # windows the Fisher pass backpropagates (the first); None: a quarter, at least 8
    images: str | None = None  # vision-language models: folder, file, or "default" (shipped photos)
    prompt: str | None = None
    text_only: bool = False
    max_memory: str | None = None  # stream block by block under this cap (analysis.streaming); "auto": when needed
    context: bool = False  # quantized-context pass: restore_gain, context_output_rel_error (objective "restore")
    equalize: bool | None = None  # power-of-two channel scales first (analysis.equalize); None: see `equalizes`

    def __post_init__(self):
        from .models import resolve_dtype

        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))  # "auto" -> bf16 / fp32
        check_fisher_samples(self.fisher_samples)
        if self.fisher_samples is not None and not self.fisher:
            raise ValueError("--fisher-samples counts the windows of the Fisher pass, which --no-fisher skips: drop "
                             "one of the two")

    def format_values(self) -> list:
        """The candidate formats as values (:mod:`analysis.formats`). Unset, the blocksize menu
        ``nf4,nf4-bs32`` (better than blocksize 64 alone on held-out text at +10 % and +33 %,
        benchmarks/README.md); ``nf4`` alone with ``--blocksize`` other than 64 or without double quant
        (the menu counts its budgets from blocksize 64 and is written with double quant), and with ``--context``
        (its restore gains are measured in the all-4-bit model of one format: ``--objective restore``
        has no score for a second entry). A streamed analysis (``--max-memory``) measures the menu too: a menu
        plan's export reads the checkpoint tensor by tensor (:mod:`planner.prequantized_stream`)."""
        if self.formats is not None:
            return parse_formats(self.formats, self.blocksize, self.double_quant)
        menu = self.blocksize == 64 and self.double_quant and not self.context
        return parse_formats(DEFAULT_FORMATS if menu else "nf4", self.blocksize, self.double_quant)

    def check_equalize(self) -> None:
        """Refuse an explicit ``--equalize`` that a streamed analysis cannot honour (``max_memory`` resolved)."""
        if self.max_memory and self.equalize:
            raise ValueError("--equalize is not available with --max-memory yet (the streamed steps read the source "
                             "weights as they are): drop --equalize, or run in memory")

    @property
    def equalizes(self) -> bool:
        """Whether the analysis scales the model's channels first (:mod:`analysis.equalize`): by default with the
        blocksize menu in memory. Not with ``--formats`` (a skip-list-only plan promises a BitsAndBytesConfig that
        reproduces the checkpoint from the source weights), nor under ``--max-memory`` (the streamed steps read the
        source weights as they are)."""
        if self.max_memory:
            return False
        return self.equalize if self.equalize is not None else self.formats is None and len(self.format_values()) > 1


def calibration_of(source, config: AnalyzeConfig):
    """The calibration set ``config`` describes for the model at ``source`` (text, or images + prompts for a VLM)."""
    from transformers import AutoConfig

    from .models import load_processor
    from .vision import calibration_for_model

    return calibration_for_model(
        AutoConfig.from_pretrained(source.path), load_processor(source), images=config.images,
        prompt=config.prompt, text_only=config.text_only, calib=config.calib, samples=config.samples,
        seq_len=config.seq_len, seed=config.seed)
