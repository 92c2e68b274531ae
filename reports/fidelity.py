"""Fidelity of a variant to the 16-bit model on held-out text: KL divergence, top-token agreement, perplexity.

The 16-bit model's logits on the held-out windows are a :class:`~analysis.reference.KLReference`
(computed once per batch, kept in the model's dtype: 400 MB for 4096 SmolLM2 tokens); each
variant is then run batch by batch and compared with them in float32 by
:func:`~analysis.reference.compare_tokens`, so at most one batch of full log-softmaxes is alive.

Per token t, with P the 16-bit and Q the variant's next-token distribution:
KLD_t = Σ_v P(v) (log P(v) − log Q(v)) (nats); "same top" is argmax P = argmax Q;
perplexity is exp of the mean negative log-likelihood of the actual next token under Q.
Error bars are standard errors over tokens, as llama.cpp's ``llama-perplexity`` prints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from quantplan.analysis.calibration import CalibrationSet
from quantplan.analysis.reference import KLReference, compare_tokens, forward_logits


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


def heldout_reference(model, input_ids: torch.Tensor, batch_size: int = 4) -> KLReference:
    """The 16-bit logits of ``model`` on held-out windows (``[samples, seq_len]`` token ids), cached per batch."""
    return KLReference(model, CalibrationSet(input_ids, "heldout", 0), batch_size)


def measure(model, reference: KLReference) -> Fidelity:
    """Run ``model`` on the reference's windows and compare with the cached 16-bit logits."""
    return _collect(reference, lambda batch, logits16: forward_logits(model, batch))


def fidelity_of_self(reference: KLReference) -> Fidelity:
    """The 16-bit row: KLD 0 by definition, its own perplexity."""
    return _collect(reference, lambda batch, logits16: logits16)


def _collect(reference: KLReference, variant_logits) -> Fidelity:
    parts = []
    with torch.inference_mode():
        for batch, logits16 in reference.pairs():
            parts.append(compare_tokens(logits16, variant_logits(batch, logits16), batch["input_ids"]))

    def joined(field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field).flatten().cpu().numpy() for p in parts])

    return Fidelity(joined("kld").astype(np.float64), joined("same_top"), joined("nll").astype(np.float64))
