"""Fidelity of a variant to the 16-bit model on held-out text: KL divergence, top-token agreement, perplexity.

The 16-bit model's logits are computed once per held-out batch and kept in the model's own
dtype (bf16 logits cost 2 bytes x vocab per token: 400 MB for 4096 SmolLM2 tokens); each
variant is then run batch by batch and compared in float32, so at most one batch of full
log-softmaxes is alive at a time.

Per token t, with P the 16-bit and Q the variant's next-token distribution:
KLD_t = Σ_v P(v) (log P(v) − log Q(v)) (nats); "same top" is argmax P = argmax Q;
perplexity is exp of the mean negative log-likelihood of the actual next token under Q.
Error bars are standard errors over tokens, as llama.cpp's ``llama-perplexity`` prints them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch


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


class Reference:
    """The 16-bit model's logits on held-out windows, cached per batch."""

    def __init__(self, model, input_ids: torch.Tensor, batch_size: int = 4):
        self.input_ids = input_ids
        self.batch_size = batch_size
        self.logits = [logits_of(model, batch) for batch in self.batches()]

    def batches(self):
        for start in range(0, len(self.input_ids), self.batch_size):
            yield self.input_ids[start : start + self.batch_size]

    def fidelity_of_self(self) -> Fidelity:
        """The 16-bit row: KLD 0 by definition, its own perplexity."""
        return _compare(self, lambda batch, index: self.logits[index])


def measure(model, reference: Reference) -> Fidelity:
    """Run ``model`` on the reference's windows and compare with the cached 16-bit logits."""
    return _compare(reference, lambda batch, index: logits_of(model, batch))


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (CPU, model dtype) of one batch, without a KV cache."""
    device = next(model.parameters()).device
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), **extra)
    return out.logits.detach().to("cpu")


def _compare(reference: Reference, variant_logits) -> Fidelity:
    klds, same, nlls = [], [], []
    for index, batch in enumerate(reference.batches()):
        with torch.inference_mode():
            logp = torch.log_softmax(reference.logits[index].float(), dim=-1)
            logq = torch.log_softmax(variant_logits(batch, index).float(), dim=-1)
            vocab = min(logp.shape[-1], logq.shape[-1])  # padded vocabularies: compare the shared part
            logp, logq = logp[..., :vocab], logq[..., :vocab]
            kld = (logp.exp() * (logp - logq)).sum(-1)
            klds.append(kld.flatten().numpy())
            same.append((logp.argmax(-1) == logq.argmax(-1)).flatten().numpy())
            targets = batch[:, 1:].unsqueeze(-1)
            nlls.append((-logq[:, :-1].gather(-1, targets)).flatten().numpy())
            del logp, logq
    return Fidelity(np.concatenate(klds).astype(np.float64), np.concatenate(same),
                    np.concatenate(nlls).astype(np.float64))
