"""The final norm + lm_head in token chunks: the head stage of a streamed analysis, and the Fisher pass in memory.

A whole batch's logits take tokens × vocabulary × 4 bytes and more again for the softmax,
the sampled targets and their gradient (1024 tokens × SmolLM2's 49 152 words: ~0.2 GB per
float32 copy; × Gemma-3's 262 144: ~1 GB). Here the logits exist for one chunk of tokens at a
time, sized so the chunk's work space is about the head's own weight bytes (:func:`chunk_tokens`):
the memory is then set by the weights, not by the vocabulary × the batch. The streamed analysis
runs its head stage so; in memory, :func:`chunked_loss_backward` runs the base model with its graph
and the head in chunks of at least :data:`MIN_CHUNK_BYTES` of work (:func:`memory_chunk_tokens`), for every
model whose logits are plain ``lm_head(last hidden state)`` (:func:`plain_head`; others keep
:func:`analysis.fisher.loss_backward`, and do not stream).

The loss is the one :mod:`analysis.fisher` backpropagates in memory, the same numbers in
pieces: each position's target is drawn from the model's own next-token distribution at the
batch's seeded uniform draw for that position (:func:`analysis.fisher.sample_targets`: the
same targets in chunks as in one piece, but for rounding at a boundary on CUDA), and the mean cross entropy
over the batch's tokens is the sum of each chunk's summed cross entropy divided by the token count. Its
gradient at a chunk's logits is (softmax − onehot(target)) / tokens, taken straight from the softmax the targets
are drawn from (:func:`analysis.fisher.sampled_loss_gradient`: no log-softmax, no autograd through the loss).
"""

from __future__ import annotations

import torch
from torch import nn

from .fisher import activations_need_grad, sampled_loss_gradient, sampling_uniforms
from .micro_batches import micro_batches, splittable
from .modules import output_embedding_name
from .stream_stages import final_norm
from .stream_weights import StreamingUnsupported

#: work-space bytes per logit while a chunk runs with gradients: the bf16 logits, their float32
#: copy, log-softmax, the sampling softmax, exponential draws and quotient, and the gradient
BYTES_PER_LOGIT = 32
#: config attributes that change the logits after lm_head (Gemma-2's soft-capping, Cohere's and Granite's scales,
#: Falcon-H1's and Inkling's muP multipliers)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "logits_mup_width_multiplier")


#: the least work space a chunk of logits gets in memory (no cap there): fewer, larger chunks where the head is
#: small, since each chunk costs a few kernel launches (an H200 ran SmolLM2's Fisher pass 2.3x slower in chunks of
#: its head's weight bytes, 36 tokens, than with the whole batch's logits: benchmarks/README.md, gpu_check.py)
MIN_CHUNK_BYTES = 256 << 20


def chunk_tokens(head_weight_bytes: int, vocab: int) -> int:
    """Tokens per chunk, so that one chunk's logits work space is about the head's weight bytes."""
    return max(1, head_weight_bytes // max(vocab * BYTES_PER_LOGIT, 1))


def memory_chunk_tokens(head_weight_bytes: int, vocab: int) -> int:
    """Tokens per chunk of the in-memory Fisher pass: :func:`chunk_tokens` of at least :data:`MIN_CHUNK_BYTES`."""
    return chunk_tokens(max(head_weight_bytes, MIN_CHUNK_BYTES), vocab)


def head_work_bytes(head_weight_bytes: int, vocab: int, batch_tokens: int, hidden: int) -> int:
    """Work space of the head's backward step: one chunk's logits plus the batch's normed input and gradients."""
    chunk = min(chunk_tokens(head_weight_bytes, vocab), max(batch_tokens, 1))
    return chunk * vocab * BYTES_PER_LOGIT + batch_tokens * hidden * 16


def observe_head_input(model, probe, lm_head: str | None, hidden: torch.Tensor) -> None:
    """Forward step of the head: the probe sees lm_head's input (the normed hidden states); no logits are made."""
    if lm_head in probe.names:
        probe.observe(lm_head, final_norm(model)(hidden))


def head_input_gradient(model, probe, lm_head: str | None, hidden: torch.Tensor, seed: int,
                        chunk: int) -> torch.Tensor:
    """∂L/∂hidden of one batch, L the sampled next-token loss of :func:`analysis.fisher.loss_backward`.

    ``hidden`` is the last decoder layer's output (the streamed head stage applies the final norm).
    """
    leaf = hidden.detach().requires_grad_()
    with torch.enable_grad():
        normed = final_norm(model)(leaf)
    tokens = normed.shape[:-1].numel()
    uniforms = sampling_uniforms(tokens, normed.device, seed)
    normed.backward(normed_gradient(model, probe, lm_head, normed.detach(), uniforms, tokens, chunk))
    return leaf.grad


def normed_gradient(model, probe, lm_head: str | None, normed: torch.Tensor, uniforms: torch.Tensor, tokens: int,
                    chunk: int) -> torch.Tensor:
    """∂L/∂normed, ``normed`` the lm_head's input for (part of) one batch, the logits made ``chunk`` tokens at a time.

    ``uniforms`` are the sampling draws of ``normed``'s tokens (:func:`analysis.fisher.sampling_uniforms` of the
    whole batch, sliced to this part) and ``tokens`` the whole batch's token count the mean loss divides by.
    The probe (if lm_head is measured) sees the whole input once, as a whole-batch forward shows it;
    gradient hooks on lm_head (a GradientProbe attached by the caller) fire once per chunk and add up.
    """
    flat = normed.detach().reshape(-1, normed.shape[-1])
    if lm_head in probe.names:
        probe.observe(lm_head, flat)
    pieces = []
    with probe.paused(lm_head):
        for start in range(0, flat.shape[0], chunk):
            piece = flat[start:start + chunk].detach().requires_grad_()
            with torch.enable_grad():
                logits = model.lm_head(piece)
            gradient = sampled_loss_gradient(logits.detach(), uniforms[start:start + chunk], tokens)
            pieces.append(torch.autograd.grad(logits, piece, gradient)[0])
    return torch.cat(pieces).reshape(normed.shape)


def plain_head(model: nn.Module) -> bool:
    """Whether the logits are ``lm_head(base model's last hidden state)`` and nothing more: an ``lm_head`` Linear
    beside a base model, no soft-capping or scaling after it (:data:`LOGIT_TRANSFORMS`). Only then can the head
    run in token chunks apart from the rest."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "lm_head", None)
    return (isinstance(base, nn.Module) and base is not model and isinstance(head, nn.Linear)
            and output_embedding_name(model) == "lm_head" and not logit_transforms(model))


def logit_transforms(model: nn.Module) -> list[str]:
    """The config's settings that change the logits after lm_head (:data:`LOGIT_TRANSFORMS` set to something)."""
    text = model.config.get_text_config()
    found = [f"{name}={getattr(text, name)}" for name in LOGIT_TRANSFORMS if getattr(text, name, None) not in (None, 1, 1.0)]
    unpadded = getattr(text, "unpadded_vocab_size", None)  # logits cut to the real vocabulary after lm_head
    if unpadded is not None and unpadded != getattr(text, "vocab_size", unpadded):
        found.append(f"unpadded_vocab_size={unpadded}")
    return found


def refuse_logit_transforms(model: nn.Module) -> None:
    """Streaming makes the logits as ``lm_head(normed hidden)`` in chunks: refuse, naming the fix, a model that
    changes them afterwards (its scores and KLs would silently differ from the in-memory ones)."""
    found = logit_transforms(model)
    if found:
        raise StreamingUnsupported(f"{type(model).__name__} changes its logits after lm_head ({', '.join(found)}), "
                                   f"which the streamed head does not reproduce: run without --max-memory")


def chunked_loss_backward(model, batch: dict, device, probe, seed: int = 0, sequences: int | None = None) -> None:
    """:func:`analysis.fisher.loss_backward` (sampled targets) for a :func:`plain_head` model, its logits in token
    chunks: the base model runs with its graph, ∂L/∂(its last hidden state) comes chunk by chunk from
    :func:`normed_gradient`, and one backward runs through the base model. No whole batch's logits exist.

    With ``sequences`` a text batch runs that many sequences at a time (:mod:`analysis.micro_batches`): each part's
    loss is its share of the batch's mean, its targets the batch's draws for its tokens, so the gradients are the
    whole batch's while only one part's activations are kept for the backward."""
    head = model.lm_head
    chunk = memory_chunk_tokens(head.weight.numel() * head.weight.element_size(), head.out_features)
    base = getattr(model, model.base_model_prefix)
    split = splittable(batch) and sequences is not None
    tokens, uniforms = (batch["input_ids"].numel() if split else None), None
    for offset, part in micro_batches(batch, sequences) if split else [(0, batch)]:
        with activations_need_grad(model, part, device) as inputs:
            hidden = base(**inputs, use_cache=False).last_hidden_state
            if uniforms is None:  # drawn where the logits are, as in one piece
                tokens = tokens or hidden.shape[:-1].numel()
                uniforms = sampling_uniforms(tokens, hidden.device, seed)
            mine = uniforms[offset:offset + hidden.shape[:-1].numel()]
            hidden.backward(normed_gradient(model, probe, "lm_head", hidden.detach(), mine, tokens, chunk))
