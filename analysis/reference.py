"""The 16-bit model's logits on fixed batches, and how far a variant's next-token distribution is from them.

:class:`KLReference` runs the 16-bit model once over the batches of a calibration set (the
probe's end-to-end pass, the planner's refinement and verification) or of held-out windows (the
fidelity scoreboard) and keeps its logits, one tensor per batch, in the model's dtype on the
CPU: 2 bytes x vocabulary per token (800 MB for SmolLM2's 8192 default calibration tokens);
``max_batches`` bounds it. Comparisons read it batch by batch through :meth:`KLReference.pairs`,
so at most one batch of full float32 log-softmaxes is alive at a time.

Per position t, with P the 16-bit and Q the variant's next-token distribution over the
vocabulary both share (a padded vocabulary compares the shared part):
KL_t = Σ_v P(v) (log P(v) − log Q(v)) in nats, computed in float32 (:func:`token_kl`);
"same top" is argmax P = argmax Q; the NLL is −log Q of the actual next token
(:func:`compare_tokens`). Padding (``attention_mask`` 0) is left out of sums (:func:`kl_sum`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quantplan.common.batches import batch_to, model_device


class KLReference:
    """The 16-bit model's next-token logits on the first ``max_batches`` batches of ``calibration``.

    ``calibration`` is anything with ``batches(batch_size)`` (model keyword arguments, always
    in the same order) and ``num_batches(batch_size)``: a calibration set, image + prompt
    calibration, or held-out windows (:class:`~analysis.calibration.CalibrationSet`).
    """

    def __init__(self, model, calibration, batch_size: int = 4, max_batches: int | None = None,
                 progress: bool = False):
        total = calibration.num_batches(batch_size)
        self.count = total if max_batches is None else min(total, max_batches)
        self.calibration, self.batch_size = calibration, batch_size
        self.logits = []
        with torch.inference_mode():
            for batch in tqdm(self.batches(), total=self.count, desc="16-bit logits", disable=not progress,
                              leave=False):
                self.logits.append(forward_logits(model, batch).detach().to("cpu"))
        self.tokens = sum(int(token_mask(batch, logits).sum()) for batch, logits in self.pairs())

    def batches(self) -> Iterator[dict]:
        """The calibration batches this reference covers, in order."""
        for index, batch in enumerate(self.calibration.batches(self.batch_size)):
            if index >= self.count:
                return
            yield batch

    def pairs(self) -> Iterator[tuple[dict, torch.Tensor]]:
        """Each batch with its 16-bit logits, in order: the one way comparisons read the reference."""
        return zip(self.batches(), self.logits, strict=True)


def calibration_kld(model, reference: KLReference) -> float:
    """Mean next-token KL divergence (nats per token) of ``model`` as it is now from the 16-bit logits."""
    total = 0.0
    with torch.inference_mode():
        for batch, logits16 in reference.pairs():
            total += float(kl_sum(logits16, forward_logits(model, batch), batch))
    return total / max(reference.tokens, 1)


@dataclass(frozen=True)
class TokenComparison:
    """Per-position comparison of one batch with its 16-bit logits (float32 / bool tensors)."""

    kld: torch.Tensor  # [batch, seq]: KL(P_16 ‖ Q) per position (nats)
    same_top: torch.Tensor  # [batch, seq]: argmax P_16 = argmax Q
    nll: torch.Tensor  # [batch, seq - 1]: −log Q(actual next token)


def compare_tokens(logits16: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor) -> TokenComparison:
    """KL, same top token and next-token NLL at every position (what the fidelity scoreboard reports)."""
    logp, logq = log_probs(logits16, logits)
    targets = input_ids[:, 1:].to(logq.device).unsqueeze(-1)
    return TokenComparison(token_kl(logp, logq), logp.argmax(-1) == logq.argmax(-1),
                           -logq[:, :-1].gather(-1, targets).squeeze(-1))


def kl_sum(logits16: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Σ over (unmasked) positions of KL(P_16 ‖ Q), in float32; differentiable in ``logits``."""
    per_token = token_kl(*log_probs(logits16, logits))
    return (per_token * token_mask(batch, per_token).to(per_token)).sum()


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per position from log-probabilities over the last dimension."""
    return (logp.exp() * (logp - logq)).sum(-1)


def log_probs(logits16: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-softmaxes of both over the vocabulary they share, on ``logits``' device."""
    vocab = min(logits16.shape[-1], logits.shape[-1])
    logp = torch.log_softmax(logits16[..., :vocab].to(logits.device).float(), dim=-1)
    logq = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    return logp, logq


def token_mask(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's attention mask shaped [batch, seq] on ``like``'s device (all ones without one)."""
    mask = batch.get("attention_mask")
    shape = like.shape[:2]
    return mask.to(like.device).reshape(shape) if mask is not None else torch.ones(shape, device=like.device)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """``model``'s logits on one batch (on the model's device), without a KV cache where it keeps one."""
    return model(**batch_to(batch, model_device(model)), **_no_cache(model)).logits


def _no_cache(model) -> dict:
    parameters = inspect.signature(model.forward).parameters.values()
    takes = any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return {"use_cache": False} if takes else {}
