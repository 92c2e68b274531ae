"""The final norm + lm_head stage of a streamed analysis, run in token chunks.

A whole batch's logits take tokens × vocabulary × 4 bytes and more again for the softmax,
the sampled targets and their gradient (1024 tokens × SmolLM2's 49 152 words: ~0.2 GB per
float32 copy). Here the logits exist for one chunk of tokens at a time, sized so the chunk's
work space is about the head's own weight bytes (:func:`chunk_tokens`): the memory a stage
needs is then set by its weights, not by the vocabulary × the batch.

The loss is the one :mod:`analysis.fisher` backpropagates in memory, the same numbers in
pieces: each position's target is drawn from the model's own next-token distribution at the
batch's seeded uniform draw for that position (:func:`analysis.fisher.sample_targets`: the
same targets in chunks as in one piece, on the CPU and on CUDA), and the mean cross entropy
over the batch's tokens is the sum of each chunk's summed cross entropy divided by the token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fisher import sample_targets, sampling_uniforms
from .stream_stages import final_norm

#: work-space bytes per logit while a chunk runs with gradients: the bf16 logits, their float32
#: copy, log-softmax, the sampling softmax, exponential draws and quotient, and the gradient
BYTES_PER_LOGIT = 32


def chunk_tokens(head_weight_bytes: int, vocab: int) -> int:
    """Tokens per chunk, so that one chunk's logits work space is about the head's weight bytes."""
    return max(1, head_weight_bytes // max(vocab * BYTES_PER_LOGIT, 1))


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

    ``hidden`` is the last decoder layer's output. The probe (if lm_head is measured) sees the
    whole normed input once, as in memory; gradient hooks on lm_head (a GradientProbe attached by
    the caller) fire once per chunk and add up.
    """
    leaf = hidden.detach().requires_grad_()
    with torch.enable_grad():
        normed = final_norm(model)(leaf)
    flat = normed.detach().reshape(-1, normed.shape[-1])
    if lm_head in probe.names:
        probe.observe(lm_head, flat)
    tokens = flat.shape[0]
    uniforms = sampling_uniforms(tokens, flat.device, seed)
    pieces = []
    for start in range(0, tokens, chunk):
        piece = flat[start:start + chunk].detach().requires_grad_()
        with torch.enable_grad():
            logits = model.lm_head(piece).float()
            with torch.no_grad():
                target = sample_targets(logits, uniforms[start:start + chunk])
            loss = F.cross_entropy(logits, target, reduction="sum") / tokens
            pieces.append(torch.autograd.grad(loss, piece)[0])
    normed.backward(torch.cat(pieces).reshape(normed.shape))
    return leaf.grad
