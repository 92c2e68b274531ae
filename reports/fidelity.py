"""Fidelity of a variant to the 16-bit model on held-out text: KL divergence, top-token agreement, perplexity.

The held-out windows are a :class:`~analysis.reference.KLReference`: the 16-bit logits of one
batch are computed, every variant is compared with them in float32
(:meth:`~analysis.head_chunks.HeadChunk.compare`, the numbers of
:func:`~analysis.reference.compare_tokens`), and only the per-token results are kept. Where the
logits are plain ``lm_head(hidden)`` they are made and compared one chunk of tokens at a time
(:mod:`analysis.head_chunks`), so no batch × vocabulary tensor exists; otherwise one batch's. Simulated variants of the 16-bit model share
each batch's 16-bit forward (:func:`measure_variants`); a separately loaded model (a real
bitsandbytes load) is compared with the 16-bit model's logits made again per batch (:func:`measure`):
where the head is plain, lm_head of the 16-bit last hidden states that :func:`measure_variants` kept
in the reference (:meth:`~analysis.reference.KLReference.hidden16`: no 16-bit base forward again),
else a whole 16-bit forward.
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
    ``lm_head(hidden)``, one chunk of tokens at a time from the reference's kept 16-bit hidden states:
    :func:`~analysis.head_chunks.pair_chunks`)."""
    if model is reference.model:
        raise ValueError("measure() compares another model with the reference's 16-bit one; for weights swapped "
                         "into the reference's own model use measure_variants()")
    return _gathered(pair_chunks(reference, model), {"": None}, reference.tokens)[""]


def measure_variants(reference: KLReference, cache: QuantCache, variants: Mapping) -> dict:
    """Fidelity of each simulated variant (key -> quantized module names; None: the 16-bit model itself).

    Batch-outer: each batch's 16-bit logits are computed once (chunk of tokens by chunk where the
    head is plain) and every variant is compared with them before the next
    (:func:`~analysis.reference.for_each_variant`).
    """
    return _gathered(for_each_variant(reference, cache, variants), variants, reference.tokens)


def measure_variants_streamed(path, input_ids: torch.Tensor, variants: Mapping, fmt, options) -> dict:
    """:func:`measure_variants` for the model saved in ``path``, read block by block (never whole in memory).

    ``options`` is an :class:`analysis.stream_variants.StreamOptions` (batch size, device, cap);
    each variant's per-token results are gathered chunk by chunk, in the order the in-memory pass has them.
    """
    from quantplan.analysis.stream_variants import variant_logit_chunks

    windows = CalibrationSet(input_ids, "heldout", 0)
    return _gathered(variant_logit_chunks(path, windows, variants, fmt, options), variants, input_ids.numel())


def fidelity_of_self(reference: KLReference) -> Fidelity:
    """The 16-bit row: KLD 0 by definition, its own perplexity."""
    return _gathered(pair_chunks(reference), {"": None}, reference.tokens)[""]


def _gathered(chunks, labels, tokens: int) -> dict:
    """label -> :class:`Fidelity` of the :class:`~analysis.head_chunks.HeadChunk` values ``chunks`` (compared one by
    one, each label's in order), for ``labels``; ``tokens``: about how many positions each label has."""
    columns = {label: _Columns(tokens) for label in labels}
    for chunk in chunks:
        with torch.inference_mode():
            columns[chunk.label].add(chunk.compare())
    return {label: c.fidelity() for label, c in columns.items()}


class _Columns:
    """One variant's per-token results, copied chunk by chunk into arrays made before the pass (doubled when full).

    Not a list of each chunk's small result tensors: each of those, kept to the end, was allocated while the
    chunk's rows × vocabulary temporaries came and went, and glibc's malloc placed it in the space one of them had
    freed, so the next temporary no longer fit there and took new memory: a scoreboard on SmolLM2's vocabulary
    grew by its temporaries' bytes at every chunk (a tiny model with 49k words over 2 batches: 1.9 GiB peak,
    0.66 GiB with nothing kept).
    """

    DTYPES = {"kld": np.float64, "same_top": np.bool_, "nll": np.float64}

    def __init__(self, capacity: int):
        self.arrays = {field: np.empty(max(capacity, 1), dtype) for field, dtype in self.DTYPES.items()}
        self.used = dict.fromkeys(self.DTYPES, 0)

    def add(self, comparison) -> None:
        """Append one chunk's :class:`~analysis.reference.TokenComparison`."""
        for field in self.DTYPES:
            values = getattr(comparison, field).flatten().cpu().numpy()
            start, end = self.used[field], self.used[field] + len(values)
            if end > len(self.arrays[field]):
                grown = np.empty(max(2 * len(self.arrays[field]), end), self.DTYPES[field])
                grown[:start] = self.arrays[field][:start]
                self.arrays[field] = grown
            self.arrays[field][start:end] = values
            self.used[field] = end

    def fidelity(self) -> Fidelity:
        """The gathered results."""
        kld, same, nll = (self.arrays[field][: self.used[field]].copy() for field in self.DTYPES)
        return Fidelity(kld, same, nll)
