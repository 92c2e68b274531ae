"""Model inputs on the model's device: one batch (keyword arguments of ``model(**batch)``) at a time."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter: where its inputs go."""
    return next(model.parameters()).device


def batch_to(batch: dict, device) -> dict:
    """``batch`` with every tensor moved to ``device``; other values (flags, sizes, None) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def without_labels(batch: dict) -> dict:
    """``batch`` without ``labels`` (PaliGemma's processor adds them): a forward that makes no loss, or keeps one
    position's logits, must not pass them."""
    return {k: v for k, v in batch.items() if k != "labels"}
