"""The 16-bit model's logits on fixed batches, and how far a variant's next-token distribution is from them.

:class:`KLReference` names the batches of a calibration set (the probe's end-to-end pass, the
planner's refinement and verification) or of held-out windows (the fidelity scoreboard) that
variants are compared on; ``max_batches`` bounds them. It keeps no logits: the 16-bit logits
of a batch are computed when that batch is compared and dropped after it, whatever the number of
batches. Where the head is plain (below) it keeps each batch's 16-bit last hidden state once a
comparison has computed it (:meth:`KLReference.hidden16`): a model compared after the variants (the
scoreboard's bitsandbytes loads, :func:`analysis.head_chunks.pair_chunks`) reads the 16-bit run's
states instead of running the 16-bit base model again on every batch. Several variants of one
model (weights swapped by :class:`~analysis.simulate.QuantCache`) are compared against the same
16-bit batch before the next one is computed (:func:`calibration_klds`): one 16-bit forward per batch serves every variant, and its float32 log-probabilities are made
once for all of them (:class:`Logits16`). A variant runs from the first decoder layer where it
differs from the 16-bit run or an earlier variant (:mod:`analysis.shared_prefix`), with the
numbers of a whole forward.

Memory: where the logits are plain ``lm_head(last hidden state)`` (:func:`analysis.stream_head.plain_head`,
most models) no tensor of a batch's tokens × vocabulary exists: each run stops at the base model's
last hidden states (tokens × hidden, one per run of the batch), and lm_head is applied a chunk of
tokens at a time (:mod:`analysis.head_chunks`), about :data:`~analysis.stream_head.MIN_CHUNK_BYTES`
of logits work space a chunk: the 16-bit chunk's logits and log-probabilities once, then each
variant's, compared before the next chunk (a 262k vocabulary × 1024 tokens was 1 GB per float32
copy, several copies alive at once). A model that changes its logits after lm_head (soft-capping,
scales: :func:`~analysis.stream_head.logit_transforms`) compares whole batches: one batch ×
vocabulary of 16-bit log-probabilities plus one variant's logits at a time. The refinement's
gradient pass (:func:`analysis.endtoend.restore_gains`) still makes one batch's logits whole.
The kept 16-bit hidden states stay for the reference's life, on the model's device: its tokens ×
hidden × the states' element size (SmolLM2's held-out scoreboard, 2048 tokens × 576 × 4 B in
float32: 4.7 MB; a verification's 4096 tokens twice that), none where the logits are transformed
after lm_head.

Per position t, with P the 16-bit and Q the variant's next-token distribution over the
vocabulary both share (a padded vocabulary compares the shared part):
KL_t = Σ_v P(v) (log P(v) − log Q(v)) in nats, computed in float32 (:func:`token_kl`);
"same top" is argmax P = argmax Q; the NLL is −log Q of the actual next token
(:func:`compare_tokens`). Padding (``attention_mask`` 0) is left out of sums (:func:`kl_sum`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from quantplan.common.batches import batch_to, model_device

if TYPE_CHECKING:
    from .head_chunks import HeadChunk


class KLReference:
    """The first ``max_batches`` batches of ``calibration`` and the 16-bit ``model`` that scores them.

    ``calibration`` is anything with ``batches(batch_size)`` (model keyword arguments, always
    in the same order) and ``num_batches(batch_size)``: a calibration set, image + prompt
    calibration, or held-out windows (:class:`~analysis.calibration.CalibrationSet`).
    ``tokens`` counts the compared (unmasked) positions. ``first_batch`` skips the batches before it (the
    held-back batches of :class:`quantplan.endtoend.EndToEnd` follow those the refinement fits); the indices of
    :meth:`hidden16` count from it.

    Everything it computes or keeps is the 16-bit model's: whoever asks for it sets the model's weights
    16-bit first (a :class:`~analysis.simulate.QuantCache` round-tripping nothing), and the 16-bit
    weights themselves never change while the reference is in use.
    """

    def __init__(self, model, calibration, batch_size: int = 4, max_batches: int | None = None,
                 progress: bool = False, first_batch: int = 0):
        available = max(0, calibration.num_batches(batch_size) - first_batch)
        self.count = available if max_batches is None else min(available, max_batches)
        self.first_batch = first_batch  # batches before it are not this reference's (held back for another use)
        self.model, self.calibration, self.batch_size, self.progress = model, calibration, batch_size, progress
        self.tokens = sum(batch_tokens(batch) for batch in self.batches())
        self._hidden16: dict[int, torch.Tensor] = {}  # batch index -> the 16-bit last hidden state (hidden16)

    def batches(self) -> Iterator[dict]:
        """The calibration batches this reference covers (``count`` from ``first_batch`` on), in order."""
        for index, batch in enumerate(self.calibration.batches(self.batch_size)):
            if index >= self.first_batch + self.count:
                return
            if index >= self.first_batch:
                yield batch

    def logits16(self, batch: dict) -> torch.Tensor:
        """The model's logits on ``batch`` with its weights as they are now (call it with the 16-bit ones)."""
        with torch.inference_mode():
            return forward_logits(self.model, batch).detach()

    def hidden16(self, index: int, batch: dict) -> torch.Tensor:
        """The 16-bit model's last hidden state on batch ``index`` (``batch``), what lm_head reads in a
        :func:`~analysis.stream_head.plain_head` model (:func:`analysis.head_chunks.base_hidden`): the one an
        earlier comparison kept, else computed now (the model must be 16-bit now, as for :meth:`logits16`) and kept.

        A kept state is the 16-bit one whatever the weights are now; one computed with round-tripped weights must
        never be kept (:meth:`keep_hidden16`). Memory: tokens × hidden × element size per batch, kept (module docstring).
        """
        if index not in self._hidden16:
            from .head_chunks import base_hidden

            with torch.inference_mode():
                self.keep_hidden16(index, base_hidden(self.model, batch))
        return self._hidden16[index]

    def has_hidden16(self, index: int) -> bool:
        """Whether batch ``index``'s 16-bit last hidden state is kept (an earlier comparison's, or lent by the
        analysis' calibration pass: :class:`~analysis.kept_hidden.KeptHidden`)."""
        return index in self._hidden16

    def keep_hidden16(self, index: int, hidden: torch.Tensor) -> None:
        """Keep ``hidden``, the model's last hidden state on batch ``index`` computed with its 16-bit weights (never
        a variant's: every later :meth:`hidden16` of the batch returns it), for later comparisons of that batch.

        Kept as given, not copied: nothing may change it in place afterwards (a run's own output, read only).
        """
        self._hidden16[index] = hidden

    def pairs(self, desc: str = "16-bit logits") -> Iterator[tuple[dict, torch.Tensor]]:
        """Each batch with its 16-bit logits, computed one batch at a time (the model must be 16-bit now)."""
        for batch in tqdm(self.batches(), total=self.count, desc=desc, disable=not self.progress, leave=False):
            yield batch, self.logits16(batch)


def for_each_variant(reference: KLReference, cache, variants: Mapping[str, Iterable[str]]) -> Iterator[HeadChunk]:
    """Per batch, every variant's logits beside the 16-bit ones, as :class:`~analysis.head_chunks.HeadChunk` values.

    ``cache`` (a :class:`~analysis.simulate.QuantCache` of the reference's model) swaps in the
    round-tripped weights of each variant's module names in turn, changing only the modules
    that differ from the previous variant; the 16-bit weights are back when the loop ends.
    A variant whose names are None is the 16-bit model itself: its logits are the reference's; names
    given as a mapping (name -> 4-bit format) round-trip each module in its own format (a blocksize menu).
    Each variant starts at the first decoder layer where it differs from the 16-bit run or an
    earlier variant (:class:`~analysis.shared_prefix.PrefixRuns`): the same numbers as whole forwards.
    Batch-outer; within a batch, chunk by chunk of tokens, then variant by variant, the chunk's 16-bit
    logits (:class:`Logits16`, their log-probabilities made once for every variant) shared by all
    (:mod:`analysis.head_chunks`; one chunk covering the batch where the logits are transformed after lm_head).
    In chunks, the 16-bit run's last hidden states are kept in the reference (:meth:`KLReference.keep_hidden16`).
    """
    from .head_chunks import VariantRuns
    from .shared_prefix import PrefixRuns

    model = reference.model
    ran = {label: names for label, names in variants.items() if names is not None}
    formats = {label: names if isinstance(names, Mapping) else None for label, names in ran.items()}
    configs = [{}] + [{n: (formats[label] or {}).get(n) or cache.format for n in names}
                      for label, names in ran.items()]
    runs = PrefixRuns(model, configs)
    plan = VariantRuns(reference, cache, runs, variants, formats, {label: i for i, label in enumerate(ran, 1)})
    try:
        for index, batch in enumerate(tqdm(reference.batches(), total=reference.count,
                                           desc=f"{len(variants)} variant(s) vs 16-bit",
                                           disable=not reference.progress, leave=False)):
            runs.new_batch()
            yield from plan.batch_chunks(index, batch)
        runs.new_batch()
    finally:
        cache.set_quantized(())


def calibration_klds(reference: KLReference, cache, variants: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Mean next-token KL divergence (nats per token) from 16-bit of each variant (label -> quantized names)."""
    totals = dict.fromkeys(variants, 0.0)
    for chunk in for_each_variant(reference, cache, variants):
        with torch.inference_mode():
            totals[chunk.label] += float(chunk.kl_sum())
    return {label: total / max(reference.tokens, 1) for label, total in totals.items()}


class Logits16:
    """One batch's 16-bit logits, with their float32 log-probabilities and probabilities made once (on first use)
    for every variant compared with them, instead of once per variant."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self._made: dict[tuple, torch.Tensor | Logits16] = {}  # statistics, and the pieces of :meth:`rows`

    def log_probs(self, vocab: int, device) -> torch.Tensor:
        """float32 log-softmax over the first ``vocab`` entries, on ``device``."""
        key = ("log", vocab, str(device))
        if key not in self._made:
            self._made[key] = torch.log_softmax(self.logits[..., :vocab].to(device).float(), dim=-1)
        return self._made[key]

    def probs(self, vocab: int, device) -> torch.Tensor:
        """exp of :meth:`log_probs`."""
        key = ("p", vocab, str(device))
        if key not in self._made:
            self._made[key] = self.log_probs(vocab, device).exp()
        return self._made[key]

    def top(self, vocab: int, device) -> torch.Tensor:
        """The most likely token of each row (argmax of :meth:`log_probs`)."""
        key = ("top", vocab, str(device))
        if key not in self._made:
            self._made[key] = self.log_probs(vocab, device).argmax(-1)
        return self._made[key]

    def rows(self, part: slice) -> Logits16:
        """The logits of rows ``part`` as their own :class:`Logits16`, made once: every variant compared with these
        rows reads the same float32 statistics (:meth:`analysis.head_chunks.HeadChunk.pieces`)."""
        key = ("rows", part.start, part.stop)
        if key not in self._made:
            self._made[key] = Logits16(self.logits[part])
        return self._made[key]


def as_logits16(logits16: torch.Tensor | Logits16) -> Logits16:
    """``logits16`` as :class:`Logits16` (a bare tensor wrapped for one comparison)."""
    return logits16 if isinstance(logits16, Logits16) else Logits16(logits16)


@dataclass(frozen=True)
class VariantKLs:
    """Mean next-token KL from 16-bit of each variant (label -> nats per token), and the tokens it was measured on."""

    kld: dict[str, float]
    tokens: int


@dataclass(frozen=True)
class InMemoryKLs:
    """``variants -> VariantKLs`` in a loaded 16-bit model: its reference's batches, its QuantCache's round trips.

    The measurement :func:`planner.verify.verify` runs when the model fits in memory; names the
    model does not hold are left out (:class:`analysis.stream_variants.StreamedKLs` is the other one).
    """

    reference: KLReference
    cache: object  # analysis.simulate.QuantCache of the reference's model

    def __call__(self, variants: Mapping[str, Mapping | Iterable[str] | None]) -> VariantKLs:
        held = {label: None if names is None else
                {n: (names.get(n) if isinstance(names, Mapping) else None) for n in names if n in self.cache.modules}
                for label, names in variants.items()}
        return VariantKLs(calibration_klds(self.reference, self.cache, held), self.reference.tokens)


def calibration_kld(reference: KLReference, cache, quantized: Iterable[str] = ()) -> float:
    """Mean next-token KL divergence from 16-bit with the modules in ``quantized`` round-tripped."""
    return calibration_klds(reference, cache, {"variant": quantized})["variant"]


def model_kld(model, reference: KLReference) -> float:
    """Mean next-token KL divergence of ``model`` as it is now from the reference's model, which must be
    another, 16-bit one (two models in memory: for a model changed in ways a QuantCache does not express)."""
    from .head_chunks import pair_chunks

    total = 0.0
    for chunk in pair_chunks(reference, model):
        with torch.inference_mode():
            total += float(chunk.kl_sum())
    return total / max(reference.tokens, 1)


def batch_tokens(batch: dict) -> int:
    """The positions of one batch that comparisons count: its attention mask's ones (all without a mask)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch["input_ids"]
    return int(ids.shape[0] * ids.shape[1])


@dataclass(frozen=True)
class TokenComparison:
    """Per-position comparison of one batch with its 16-bit logits (float32 / bool tensors)."""

    kld: torch.Tensor  # [batch, seq]: KL(P_16 ‖ Q) per position (nats)
    same_top: torch.Tensor  # [batch, seq]: argmax P_16 = argmax Q
    nll: torch.Tensor  # [batch, seq - 1]: −log Q(actual next token)


def compare_tokens(logits16: torch.Tensor | Logits16, logits: torch.Tensor, input_ids: torch.Tensor) -> TokenComparison:
    """KL, same top token and next-token NLL at every position (what the fidelity scoreboard reports)."""
    reference = as_logits16(logits16)
    logp, logq = log_probs(reference, logits)
    targets = input_ids[:, 1:].to(logq.device).unsqueeze(-1)
    return TokenComparison(token_kl(logp, logq, reference.probs(logq.shape[-1], logq.device)),
                           reference.top(logq.shape[-1], logq.device) == logq.argmax(-1),
                           -logq[:, :-1].gather(-1, targets).squeeze(-1))


def kl_sum(logits16: torch.Tensor | Logits16, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Σ over (unmasked) positions of KL(P_16 ‖ Q), in float32; differentiable in ``logits``."""
    reference = as_logits16(logits16)
    logp, logq = log_probs(reference, logits)
    per_token = token_kl(logp, logq, reference.probs(logq.shape[-1], logits.device))
    return (per_token * token_mask(batch, per_token).to(per_token)).sum()


def token_kl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P ‖ Q) per position from log-probabilities over the last dimension (``p``: exp(logp) when made already).

    Without gradients the product is taken in place in the difference: one positions × vocabulary
    temporary instead of two (the same numbers: the product is the same float multiplication).
    """
    diff = logp - logq
    p = logp.exp() if p is None else p
    return (diff * p if diff.requires_grad else diff.mul_(p)).sum(-1)


def log_probs(logits16: torch.Tensor | Logits16, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-softmaxes of both over the vocabulary they share, on ``logits``' device."""
    reference = as_logits16(logits16)
    vocab = min(reference.logits.shape[-1], logits.shape[-1])
    logp = reference.log_probs(vocab, logits.device)
    if logits is reference.logits and logp.shape[-1] == logits.shape[-1]:  # the 16-bit row: the same log-softmax
        return logp, logp
    logq = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    return logp, logq


def token_mask(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's attention mask shaped [batch, seq] on ``like``'s device (all ones without one)."""
    mask = batch.get("attention_mask")
    shape = like.shape[:2]
    return mask.to(like.device).reshape(shape) if mask is not None else torch.ones(shape, device=like.device)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """``model``'s logits on one batch (on the model's device), without a KV cache where it keeps one."""
    return model(**batch_to(batch, model_device(model)), **no_cache(model)).logits


def no_cache(model) -> dict:
    """``use_cache=False`` where ``model``'s forward takes it (no KV cache kept for a one-off forward)."""
    parameters = inspect.signature(model.forward).parameters.values()
    takes = any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return {"use_cache": False} if takes else {}
