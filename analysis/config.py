"""AnalyzeConfig: everything ``analyze`` needs besides the model, as one frozen value.

Built once (from command-line arguments or by hand) and passed whole: the calibration
source and size, the candidate formats, where and how the pass runs, and which optional
scores it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import parse_formats


@dataclass(frozen=True)
class AnalyzeConfig:
    """How to measure a model: calibration, formats, device, optional scores."""

    calib: str | None = None  # file/folder/hub dataset; None: the shipped English set
    samples: int = 32  # calibration windows
    seq_len: int = 256  # tokens per window
    seed: int = 0
    formats: str = "nf4"  # comma list of candidate formats
    blocksize: int = 64
    double_quant: bool = True
    device: str = "cpu"
    dtype: str = "bf16"  # dtype the model is analyzed in
    batch_size: int = 4
    resume: bool = False
    progress: bool = True
    fisher: bool = True  # Fisher-weighted scores: one backward pass per batch
    images: str | None = None  # vision-language models: folder, file, or "default" (shipped photos)
    prompt: str | None = None
    text_only: bool = False
    max_memory: str | None = None  # stream block by block under this cap (analysis.streaming); "auto": when needed
    context: bool = False  # quantized-context pass: restore_gain, context_output_rel_error (objective "restore")

    def format_values(self) -> list:
        """The candidate formats as values (:mod:`analysis.formats`)."""
        return parse_formats(self.formats, self.blocksize, self.double_quant)


def calibration_of(source, config: AnalyzeConfig):
    """The calibration set ``config`` describes for the model at ``source`` (text, or images + prompts for a VLM)."""
    from transformers import AutoConfig

    from .models import load_processor
    from .vision import calibration_for_model

    return calibration_for_model(
        AutoConfig.from_pretrained(source.path), load_processor(source), images=config.images,
        prompt=config.prompt, text_only=config.text_only, calib=config.calib, samples=config.samples,
        seq_len=config.seq_len, seed=config.seed)
