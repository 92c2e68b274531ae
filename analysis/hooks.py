"""Hooks on named modules for the duration of a block: how the probes attach to a model and always detach."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_hooks(model: nn.Module, hooks: Mapping[str, Callable], *, pre: bool = False):
    """Register ``hooks`` (module name -> forward hook, or forward pre-hook with ``pre``) on ``model``'s modules
    inside the block; every one registered is removed on the way out, also after an error."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, hook in hooks.items():
            module = modules[name]
            handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
