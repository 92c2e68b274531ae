"""Keep Python's cyclic garbage collector off the objects that live as long as the process: the imported libraries'.

A ``quantplan run`` collects garbage explicitly between its stages (a model's cycles hold its tensors: they
must go before the next model loads), and CPython collects the oldest generation on its own as objects pile
up. Each full collection walks every tracked object, and after importing torch, transformers and bitsandbytes
there are about 0.5 million of them (modules, classes, functions, their dicts), none of which ever becomes
garbage: 0.32 s a collection on SmolLM2's default run, six of them, 2 s of a 72 s run. ``gc.freeze()`` moves the
objects alive at that moment to a permanent generation the collector skips (CPython's documented remedy for
exactly this); a collection afterwards walks only what was made later (the model, the run's own objects):
about 0.01 s. Freeze only where nothing large and short-lived is alive (before any model loads): frozen objects
are still freed by reference counting, but a frozen cycle would never be.
"""

from __future__ import annotations

import gc

_froze: list[bool] = [False]  # whether freeze_imported froze (and thaw should unfreeze)


def freeze_imported() -> None:
    """Import the libraries a job uses, collect once, and freeze every object alive now (see the module docstring).

    Call at a command's start, before any model or data is made. Leaves a freeze someone else made as it is."""
    import bitsandbytes  # noqa: F401  (imported here so that its objects and transformers' are frozen too)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
        _froze[0] = True


def thaw() -> None:
    """Give the frozen objects back to the collector: a command run in-process (tests, a notebook calling
    ``main``) must not leave the caller's objects outside garbage collection after it returns."""
    if _froze[0]:
        gc.unfreeze()
        _froze[0] = False
