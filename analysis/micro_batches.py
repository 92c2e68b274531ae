"""The Fisher pass's backward in micro-batches of whole sequences, so one micro-batch's saved activations fit a budget.

Autograd keeps every layer's activations of the batch until the backward has run: for SmolLM2 (30 layers) one
256-token sequence holds ~0.4 GB in float32, so the default 4-sequence batch holds ~1.6 GB, more than the model
and its Gram statistics together. The next-token loss is a mean over the batch's tokens, so running the batch a
few sequences at a time, each part's loss scaled by its share of the tokens, gives the very same gradients
(sequences do not see each other) and the same Fisher sums; only the largest part's activations are ever alive.

Only text batches are split (their tensors are ``[batch, seq_len]`` and nothing else): a vision-language batch's
pixel values and image grids do not line up with its sequences, so it runs whole; so does a model whose logits are
not plain ``lm_head(h)`` (:func:`analysis.stream_head.plain_head`: its loss runs on whole-batch logits).
"""

from __future__ import annotations

import torch

#: keyword arguments of a batch that are ``[batch, seq_len]`` per-token tensors, split along the batch
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "token_type_ids"})
#: saved activations one micro-batch may hold on the CPU (at least one sequence always runs)
CPU_ACTIVATION_BUDGET = 256 << 20
#: share of the free GPU memory one micro-batch's activations may take (kernels want large batches there)
GPU_FREE_SHARE = 0.25


def sequence_activation_bytes(text_config, seq_len: int) -> int:
    """Bytes autograd keeps for one sequence through every decoder layer: per token ~8 hidden-wide and 4 MLP-wide
    float32 tensors, plus one head × seq_len² attention matrix per layer (the analysis' peak model,
    :func:`analysis.estimate.estimate_peak`)."""
    hidden = getattr(text_config, "hidden_size", 0)
    mlp = getattr(text_config, "intermediate_size", 0)
    heads = getattr(text_config, "num_attention_heads", 1)
    per_layer = seq_len * (hidden * 8 + mlp * 4) * 4 + heads * seq_len * seq_len * 4
    return per_layer * getattr(text_config, "num_hidden_layers", 1)


def activation_budget(device) -> int:
    """Activation bytes one micro-batch may hold on ``device``: :data:`CPU_ACTIVATION_BUDGET` on the CPU, a quarter of
    the free memory on a GPU, counting as free the blocks torch's allocator holds but no tensor uses (what the last
    batch's activations left). Read it where the batch runs, after what else it needs is allocated (the statistics,
    a plan's de-quantized weights)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + max(cached, 0)) * GPU_FREE_SHARE)
    return CPU_ACTIVATION_BUDGET


def sequences_per_micro_batch(text_config, seq_len: int, budget: int) -> int:
    """How many sequences of ``seq_len`` tokens fit ``budget`` bytes of saved activations (at least one)."""
    return max(1, budget // max(sequence_activation_bytes(text_config, seq_len), 1))


def splittable(batch: dict) -> bool:
    """Whether ``batch`` is text only (:data:`TEXT_KEYS`, all ``[batch, seq_len]``), so it can be split by sequences."""
    ids = batch.get("input_ids")
    if not torch.is_tensor(ids) or ids.dim() != 2 or not set(batch) <= TEXT_KEYS:
        return False
    return all(torch.is_tensor(v) and v.shape[:2] == ids.shape for v in batch.values())


def micro_batches(batch: dict, sequences: int):
    """(token offset in the flattened batch, micro-batch) pairs of at most ``sequences`` sequences each, in order;
    the whole batch once when it is not :func:`splittable` or already small enough."""
    ids = batch.get("input_ids")
    if not splittable(batch) or len(ids) <= sequences:
        yield 0, batch
        return
    seq_len = ids.shape[1]
    for start in range(0, len(ids), sequences):
        yield start * seq_len, {key: value[start:start + sequences] for key, value in batch.items()}
