"""Next-token logits compared a chunk of tokens at a time: no tensor of a batch's tokens × vocabulary.

A batch's logits take tokens × vocabulary × 4 bytes per float32 copy (1024 tokens × Gemma-3's
262 144 words: 1 GB), and a comparison makes several (the 16-bit log-probabilities and
probabilities, each variant's logits and log-probabilities). Where the logits are plain
``lm_head(base model's last hidden state)`` (:func:`analysis.stream_head.plain_head`), the
in-memory comparison (:func:`analysis.reference.for_each_variant`) runs the base model of the
16-bit run and of each variant to their (normed) last hidden states, tokens × hidden each, and
applies lm_head to :func:`chunk_size` tokens at a time: per chunk the 16-bit logits (and their
log-probabilities, :class:`~analysis.reference.Logits16`) are made once, then every variant's
logits, and the caller compares them (KL, top token, NLL) before the next chunk. Memory then holds
one batch of hidden states per run and one chunk of logits (plus, where variants quantize
lm_head, one round-tripped lm_head weight per distinct lm_head format: at most the menu's size); the
numbers are a whole forward's, row by row. A model whose logits change after lm_head (:func:`~analysis.stream_head.logit_transforms`)
keeps whole-batch logits, as one chunk covering the batch. The streamed comparison
(:mod:`analysis.stream_variants`) yields the same :class:`HeadChunk` values.

The 16-bit run's last hidden states of each batch are kept in the reference
(:meth:`analysis.reference.KLReference.hidden16`, tokens × hidden a batch): a model compared later
(:func:`pair_chunks`, the scoreboard's bitsandbytes loads) takes them instead of a 16-bit base forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantplan.common.batches import batch_to, model_device
from quantplan.common.heap import release_if_grown

from .reference import (
    KLReference,
    Logits16,
    TokenComparison,
    as_logits16,
    forward_logits,
    log_probs,
    no_cache,
    token_kl,
    token_mask,
)
from .stream_head import memory_chunk_tokens, plain_head


@dataclass(frozen=True)
class HeadChunk:
    """One chunk of one batch's next-token logits of a variant, beside the 16-bit model's."""

    label: str
    index: int  # the batch's number
    batch: dict  # the batch (model keyword arguments), as the calibration set gives it
    rows: slice  # the positions it covers, counted over the batch flattened row-major (batch × seq)
    shape: tuple[int, int]  # (batch, seq) of the whole batch
    logits16: torch.Tensor | Logits16  # [rows, vocab]
    logits: torch.Tensor  # [rows, vocab]

    def mask(self) -> torch.Tensor:
        """The batch's attention mask at these positions (all ones without one), on the logits' device."""
        whole = token_mask(self.batch, torch.empty(self.shape, device=self.logits.device))
        return whole.reshape(-1)[self.rows]

    def compare(self) -> TokenComparison:
        """:func:`analysis.reference.compare_tokens` at these positions: KL and same top per position, the NLL of
        the actual next token at each position that has one in its window (all but each window's last); computed
        piece by piece (:meth:`pieces`)."""
        seq, ids = self.shape[1], self.batch["input_ids"].reshape(-1)
        positions = torch.arange(self.rows.start, self.rows.start + self.logits.shape[0])
        # every position's next token (a window's last reads any token: its NLL is dropped below), gathered from the
        # log-probabilities in place: no copy of the rows × vocabulary, as indexing them first would make
        targets = ids[(positions + 1).clamp(max=ids.numel() - 1)].to(self.logits.device)
        parts = [_compared(part16, logits, targets[part]) for part, part16, logits in self.pieces()]
        kl, same_top, nll = (torch.cat(column) for column in zip(*parts, strict=True))
        return TokenComparison(kl, same_top, nll[(positions % seq != seq - 1).to(nll.device)])

    def kl_sum(self) -> torch.Tensor:
        """Σ over the chunk's unmasked positions of KL(P_16 ‖ Q), in float32; computed piece by piece
        (:meth:`pieces`), but in one piece where the logits need gradients (each slice of them would add a
        gradient the size of the whole chunk)."""
        mask = self.mask()
        if self.logits.requires_grad:
            return _kl_summed(as_logits16(self.logits16), self.logits, mask)
        return torch.stack([_kl_summed(part16, logits, mask[part]) for part, part16, logits in self.pieces()]).sum()

    def pieces(self) -> Iterator[tuple[slice, Logits16, torch.Tensor]]:
        """(rows of the chunk, their 16-bit logits, the variant's) for pieces of :func:`piece_rows` rows on a CPU (one
        piece elsewhere); each piece's 16-bit statistics are made once for every variant
        (:meth:`~analysis.reference.Logits16.rows`).

        Why: the comparison makes several float32 rows × vocabulary temporaries (log-softmaxes, their difference,
        probabilities). For a whole chunk (SmolLM2: 170 rows × 49k words, 32 MiB each) glibc gives each one's memory
        back to the system when it is freed (a mapping of its own, or a trim of the heap's top), so every temporary's
        pages fault in afresh, and none stays in cache: the 16-bit statistics and four variants' comparisons of a chunk
        took 3.1x what they take in pieces (the same numbers: every statistic is per row; a KL sum adds per piece).
        A GPU's caching allocator keeps its memory: one piece there, without a launch and copy per piece.
        """
        reference, rows = as_logits16(self.logits16), self.logits.shape[0]
        step = piece_rows(reference.logits.shape[-1]) if self.logits.device.type == "cpu" else max(rows, 1)
        for start in range(0, max(rows, 1), step):
            part = slice(start, min(start + step, rows))
            part16 = reference.rows(part) if step < rows else reference
            yield part, part16, part16.logits if self.logits is reference.logits else self.logits[part]


def _compared(reference: Logits16, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of one piece: KL(P_16 ‖ Q), whether the top tokens agree, and −log Q of ``targets``."""
    logp, logq = log_probs(reference, logits)
    kl = token_kl(logp, logq, reference.probs(logq.shape[-1], logq.device))
    same_top = reference.top(logq.shape[-1], logq.device) == logq.argmax(-1)
    return kl, same_top, -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _kl_summed(reference: Logits16, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over one piece's rows where ``mask`` is set of KL(P_16 ‖ Q), in float32."""
    logp, logq = log_probs(reference, logits)
    per_token = token_kl(logp, logq, reference.probs(logq.shape[-1], logq.device))
    return (per_token * mask.to(per_token)).sum()


#: float32 bytes of one piece's rows × vocabulary (:meth:`HeadChunk.pieces`): the temporaries stay in glibc's heap,
#: below even the 1 MiB mapping threshold a streamed run sets (:func:`analysis.stream_weights.release_freed_blocks`),
#: and in a core's share of the cache. On SmolLM2's vocabulary (one thread) 0.75-4 MiB measured alike, 0.5 MiB 10 %
#: slower; under the 1 MiB threshold 0.75 MiB was 10 % faster than 2 MiB. A 256k vocabulary's one row is 1 MiB.
PIECE_BYTES = 768 << 10


def piece_rows(vocab: int) -> int:
    """Positions per piece of a comparison over ``vocab`` words (:data:`PIECE_BYTES` of float32 logits, at least one)."""
    return max(1, PIECE_BYTES // max(4 * vocab, 1))


@dataclass(frozen=True)
class VariantRuns:
    """How :func:`analysis.reference.for_each_variant` runs the variants of one model over a batch.

    ``reference``: the :class:`~analysis.reference.KLReference` whose model the variants swap weights in (it
    keeps the 16-bit run's hidden states); ``variants``: label -> module names round-tripped (None: the 16-bit model
    itself); ``formats``: label -> name -> 4-bit format where given (None: the cache's); ``order``: label -> its run
    in ``runs`` (an :class:`~analysis.shared_prefix.PrefixRuns`, run 0 the 16-bit one).
    """

    reference: KLReference
    cache: object  # analysis.simulate.QuantCache of the model
    runs: object  # analysis.shared_prefix.PrefixRuns
    variants: Mapping
    formats: Mapping
    order: Mapping[str, int]

    @property
    def model(self) -> torch.nn.Module:
        """The reference's model."""
        return self.reference.model

    def chunked(self) -> bool:
        """Whether the head runs in token chunks apart from the base model (:func:`plain_head`)."""
        return plain_head(self.model)

    def batch_chunks(self, index: int, batch: dict) -> Iterator[HeadChunk]:
        """Every variant's chunks of one batch (the runs' recorded outputs must be cleared before)."""
        return (self._chunked if self.chunked() else self._whole)(index, batch)

    def _whole(self, index: int, batch: dict) -> Iterator[HeadChunk]:
        """One chunk per variant covering the whole batch: its logits from the model's own forward."""
        model, cache = self.model, self.cache
        cache.set_quantized(())
        with torch.inference_mode():
            whole16 = self.runs.run(0, partial(forward_logits, model, batch))
        shape, rows = tuple(whole16.shape[:2]), slice(0, whole16.shape[0] * whole16.shape[1])
        logits16 = Logits16(whole16.reshape(rows.stop, -1))
        del whole16
        for label, names in self.variants.items():
            if names is None:
                yield HeadChunk(label, index, batch, rows, shape, logits16, logits16.logits)
                continue
            cache.set_quantized(names, self.formats[label])
            with torch.inference_mode():
                logits = self.runs.run(self.order[label], partial(forward_logits, model, batch))
            yield HeadChunk(label, index, batch, rows, shape, logits16, logits.reshape(rows.stop, -1))
            del logits

    def _chunked(self, index: int, batch: dict) -> Iterator[HeadChunk]:
        """Each run's last hidden states, then lm_head chunk by chunk: the 16-bit logits once per chunk.

        The 16-bit run's (run 0, every module 16-bit) is kept in the reference as computed: no later run writes it
        (a run continuing run 0's layers reads copies of their outputs, :class:`~analysis.shared_prefix.PrefixRuns`).
        Where the reference keeps it already (an earlier comparison of the batch, or the analysis' calibration pass:
        :class:`~analysis.kept_hidden.KeptHidden`) and no variant continues run 0's layers, run 0 is not run.
        """
        model, cache = self.model, self.cache
        hidden, restored = {}, {}
        cache.set_quantized(())
        with torch.inference_mode():
            if self.reference.has_hidden16(index) and not self.runs.continued(0):
                hidden[None] = self.reference.hidden16(index, batch)
            else:
                hidden[None] = self.runs.run(0, partial(base_hidden, model, batch))
                self.reference.keep_hidden16(index, hidden[None])
            for label, names in self.variants.items():
                if names is not None:
                    cache.set_quantized(names, self.formats[label])
                    if "lm_head" in names:  # its round trip, kept for the chunks
                        fmt = self._head_format(label)
                        if fmt not in restored:  # not ``setdefault``: that would de-quantize it every time
                            restored[fmt] = cache.restored("lm_head", fmt)
                    hidden[label] = self.runs.run(self.order[label], partial(base_hidden, model, batch))
        cache.set_quantized(())  # every module 16-bit again; each variant's head weight below
        weights, bias = self._head_weights(restored), model.lm_head.bias
        heads = {label: None if names is None else (partial(F.linear, weight=weights[label], bias=bias), hidden[label])
                 for label, names in self.variants.items()}
        yield from head_chunks(index, batch, model.lm_head, hidden[None], heads, chunk_size(model))

    def _head_format(self, label: str):
        """The format ``label`` round-trips lm_head in."""
        return (self.formats[label] or {}).get("lm_head") or self.cache.format

    def _head_weights(self, restored: dict) -> dict[str, torch.Tensor]:
        """label -> the lm_head weight its chunks use: the 16-bit one, or its round trip (``restored``: format -> the
        round trip made during the base runs)."""
        return {label: restored[self._head_format(label)] if names is not None and "lm_head" in names
                else self.model.lm_head.weight for label, names in self.variants.items()}


def head_chunks(index: int, batch: dict, head16, hidden16: torch.Tensor, heads: Mapping, step: int) -> Iterator[HeadChunk]:
    """lm_head of each run, ``step`` tokens at a time: per chunk the 16-bit logits once (``head16`` of the 16-bit
    run's last hidden states ``hidden16``), then each label's (``heads``: label -> (its head, its hidden states),
    or None for the 16-bit logits themselves)."""
    shape = tuple(hidden16.shape[:2])
    flat16 = hidden16.reshape(-1, hidden16.shape[-1])
    flat = {label: None if run is None else (run[0], run[1].reshape(-1, run[1].shape[-1])) for label, run in heads.items()}
    for start in range(0, shape[0] * shape[1], step):
        release_if_grown()  # chunk-sized temporaries between small results fragment glibc's heap
        rows = slice(start, start + step)
        with torch.inference_mode():
            logits16 = Logits16(head16(flat16[rows]))
        for label, run in flat.items():
            if run is None:
                logits = logits16.logits
            else:
                with torch.inference_mode():
                    logits = run[0](run[1][rows])
            yield HeadChunk(label, index, batch, rows, shape, logits16, logits)
        del logits16


def head_kl_gradient(head, weight16: torch.Tensor, hidden16: torch.Tensor, hidden: torch.Tensor, batch: dict,
                     index: int, tokens: int, step: int) -> tuple[torch.Tensor, float]:
    """∂(KL sum / ``tokens``)/∂``hidden`` and the KL sum of batch ``index``, its logits ``step`` tokens at a time.

    ``hidden``: a quantized run's last hidden states ([batch, seq, hidden], what ``head`` reads); ``hidden16``: the
    16-bit run's, read by ``weight16`` (the head's 16-bit weight, also while ``head`` is round-tripped). No whole
    batch × vocabulary tensor exists; the caller backpropagates the returned gradient through the body once. A
    gradient hook on the head's weight, where it requires one, fires once per chunk (the refinement lets it add up and
    folds it once a batch: :meth:`analysis.endtoend.GainSums.one_fold`)."""
    shape = tuple(hidden.shape[:2])
    flat, flat16 = hidden.detach().reshape(-1, hidden.shape[-1]), hidden16.reshape(-1, hidden16.shape[-1])
    pieces, total = [], 0.0
    for start in range(0, flat.shape[0], step):
        rows = slice(start, start + step)
        piece = flat[rows].detach().requires_grad_()
        with torch.no_grad():
            logits16 = Logits16(F.linear(flat16[rows], weight16, head.bias))
        with torch.enable_grad():
            kl = HeadChunk("", index, batch, rows, shape, logits16, head(piece)).kl_sum()
            (kl / tokens).backward()
        total += float(kl.detach())
        pieces.append(piece.grad)
        del logits16, kl
    return torch.cat(pieces).reshape(hidden.shape), total


def pair_chunks(reference, model=None) -> Iterator[HeadChunk]:
    """Per batch of ``reference`` (a :class:`~analysis.reference.KLReference`), ``model``'s logits beside its
    16-bit model's (``model`` None: the 16-bit logits themselves), labelled "", chunk by chunk where both
    heads are plain (:func:`plain_head`), else one chunk a batch from whole forwards. In chunks the 16-bit
    hidden states are the reference's (:meth:`~analysis.reference.KLReference.hidden16`): kept from an
    earlier comparison of the batch, else computed (the reference's model must be 16-bit now) and kept."""
    model16 = reference.model
    chunked = plain_head(model16) and (model is None or plain_head(model))
    batches = tqdm(reference.batches(), total=reference.count, desc="16-bit" if model is None else "model vs 16-bit",
                   disable=not reference.progress, leave=False)
    for index, batch in enumerate(batches):
        if chunked:
            hidden16 = reference.hidden16(index, batch)
            with torch.inference_mode():
                run = None if model is None else (model.lm_head, base_hidden(model, batch))
            yield from head_chunks(index, batch, model16.lm_head, hidden16, {"": run}, chunk_size(model16))
            continue
        with torch.inference_mode():
            whole16 = forward_logits(model16, batch)
            whole = whole16 if model is None else forward_logits(model, batch)
        shape, rows = tuple(whole16.shape[:2]), slice(0, whole16.shape[0] * whole16.shape[1])
        yield HeadChunk("", index, batch, rows, shape, Logits16(whole16.reshape(rows.stop, -1)),
                        whole.reshape(rows.stop, -1))


def chunk_size(model) -> int:
    """Tokens per chunk of the head: about :data:`~analysis.stream_head.MIN_CHUNK_BYTES` of logits work space
    or the head's weight bytes, whichever is larger (:func:`~analysis.stream_head.memory_chunk_tokens`)."""
    head = model.lm_head
    return memory_chunk_tokens(head.weight.numel() * head.weight.element_size(), head.out_features)


def base_hidden(model, batch: dict) -> torch.Tensor:
    """The base model's last hidden state on one batch (what lm_head reads in a :func:`plain_head` model)."""
    base = getattr(model, model.base_model_prefix)
    return base(**batch_to(batch, model_device(model)), **no_cache(base)).last_hidden_state
