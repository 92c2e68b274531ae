"""Fidelity of a variant to the 16-bit model on held-out text: KL divergence, top-token agreement, perplexity.

The held-out windows are a :class:`~analysis.reference.KLReference`: the 16-bit logits of one
batch are computed, every variant is compared with them in float32
(:meth:`~analysis.head_chunks.HeadChunk.compare`, the numbers of
:func:`~analysis.reference.compare_tokens`), and only the per-token results are kept. Where the
logits are plain ``lm_head(hidden)`` they are made and compared one chunk of tokens at a time
(:mod:`analysis.head_chunks`), so no batch × vocabulary tensor exists; otherwise one batch's. Simulated variants of the 16-bit model share
each batch's 16-bit forward (:func:`measure_variants`); a separately loaded model (a real
bitsandbytes load) is compared with the 16-bit model's logits recomputed per batch (:func:`measure`).
Under a memory cap the simulated variants run block by block from disk instead
(:func:`measure_variants_streamed`, :mod:`analysis.stream_variants`): the same numbers.

Per token t, with P the 16-bit and Q the variant's next-token distribution:
KLD_t = Σ_v P(v) (log P(v) − log Q(v)) (nats); "same top" is argmax P = argmax Q;
perplexity is exp of the mean negative log-likelihood of the actual next token under Q.
Error bars are standard errors over tokens, as llama.cpp's ``llama-perplexity`` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from quantplan.analysis.calibration import CalibrationSet
from quantplan.analysis.head_chunks import pair_chunks
from quantplan.analysis.reference import KLReference, for_each_variant
from quantplan.analysis.simulate import QuantCache


@dataclass
class Fidelity:
    """Per-token results of one variant; :meth:`summary` gives the scoreboard numbers."""

    kld: np.ndarray  # one value per held-out token (nats)
    same_top: np.ndarray  # bool per token
    nll: np.ndarray  # per predicted token (all but the last of each window)

    def summary(self) -> dict:
        """mean/p99 KLD, same-top %, perplexity, each with a standard error where one applies."""
        n, m = len(self.kld), len(self.nll)
        mean_nll = float(self.nll.mean())
        same = float(self.same_top.mean())
        return {
            "mean_kld": float(self.kld.mean()),
            "mean_kld_se": float(self.kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "p99_kld": float(np.percentile(self.kld, 99)),
            "same_top_pct": 100 * same,
            "same_top_se": 100 * math.sqrt(same * (1 - same) / n) if n else float("nan"),
            "ppl": math.exp(mean_nll),
            "ppl_se": math.exp(mean_nll) * float(self.nll.std(ddof=1)) / math.sqrt(m) if m > 1 else float("nan"),
            "tokens": n,
        }


def heldout_reference(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False) -> KLReference:
    """The 16-bit logits of ``model`` on held-out windows (``[samples, seq_len]`` token ids), cached per batch
    (``progress``: a progress bar per pass over the windows)."""
    return KLReference(model, CalibrationSet(input_ids, "heldout", 0), batch_size, progress=progress)


def measure(model, reference: KLReference) -> Fidelity:
    """Run ``model`` (a model other than the reference's, which must be 16-bit now) on the reference's
    windows and compare it with the 16-bit logits, one batch at a time (and, where both heads are plain
    ``lm_head(hidden)``, one chunk of tokens at a time: :func:`~analysis.head_chunks.pair_chunks`)."""
    if model is reference.model:
        raise ValueError("measure() compares another model with the reference's 16-bit one; for weights swapped "
                         "into the reference's own model use measure_variants()")
    return _joined([_compared(chunk) for chunk in pair_chunks(reference, model)])


def measure_variants(reference: KLReference, cache: QuantCache, variants: Mapping) -> dict:
    """Fidelity of each simulated variant (key -> quantized module names; None: the 16-bit model itself).

    Batch-outer: each batch's 16-bit logits are computed once (chunk of tokens by chunk where the
    head is plain) and every variant is compared with them before the next
    (:func:`~analysis.reference.for_each_variant`).
    """
    parts = {key: [] for key in variants}
    for chunk in for_each_variant(reference, cache, variants):
        parts[chunk.label].append(_compared(chunk))
    return {key: _joined(p) for key, p in parts.items()}


def measure_variants_streamed(path, input_ids: torch.Tensor, variants: Mapping, fmt, options) -> dict:
    """:func:`measure_variants` for the model saved in ``path``, read block by block (never whole in memory).

    ``options`` is an :class:`analysis.stream_variants.StreamOptions` (batch size, device, cap);
    each variant's per-token results are gathered chunk by chunk, in the order the in-memory pass has them.
    """
    from quantplan.analysis.stream_variants import variant_logit_chunks

    parts = {key: [] for key in variants}
    windows = CalibrationSet(input_ids, "heldout", 0)
    for chunk in variant_logit_chunks(path, windows, variants, fmt, options):
        with torch.inference_mode():
            parts[chunk.label].append(chunk.compare())
    return {key: _joined(p) for key, p in parts.items()}


def fidelity_of_self(reference: KLReference) -> Fidelity:
    """The 16-bit row: KLD 0 by definition, its own perplexity."""
    return _joined([_compared(chunk) for chunk in pair_chunks(reference)])


def _compared(chunk):
    with torch.inference_mode():
        return chunk.compare()


def _joined(parts) -> Fidelity:
    def joined(field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field).flatten().cpu().numpy() for p in parts])

    return Fidelity(joined("kld").astype(np.float64), joined("same_top"), joined("nll").astype(np.float64))
