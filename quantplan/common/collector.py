"""Keep Python's cyclic garbage collector off the objects that live as long as the process: the imported libraries'.

A ``quantplan run`` collects garbage explicitly between its stages (a model's cycles hold its tensors: they
must go before the next model loads), and CPython collects the oldest generation on its own as objects pile
up. Each full collection walks every tracked object, and after importing torch, transformers and bitsandbytes
there are about 0.5 million of them (modules, classes, functions, their dicts), none of which ever becomes
garbage: 0.32 s a collection on SmolLM2's default run, six of them, 2 s of a 72 s run. ``gc.freeze()`` moves the
objects alive at that moment to a permanent generation the collector skips (made for long-lived heaps like this
one; its documented use is before a fork); a collection afterwards walks only what was made later (the model, the
run's own objects): about 0.01 s. :func:`imports_frozen` freezes for the length of a block and gives the objects back after it, so
a caller's own garbage (a notebook's, a test's) is collected as before once the block ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_frozen() -> Iterator[None]:
    """Within the block, the collector skips every object alive when it starts, after importing the libraries a
    job uses (see the module docstring). Enter it before any model or data is made, and after anything that must
    precede bitsandbytes' import (which queries every CUDA device: call
    :func:`quantplan.analysis.distributed.bind_local_gpu` first). A freeze the caller made already is left as it is,
    and not undone."""
    import bitsandbytes  # noqa: F401  (its objects and transformers' are frozen too)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
