"""Hand the C heap's freed pages back to the operating system between stages.

glibc's malloc keeps freed memory for reuse once its threshold for direct mappings has grown past a
tensor's size: after the Fisher pass of SmolLM2 the process held 4.2 GB of which 1.1 GB was alive, so
every later stage looked (and, for the rest of the machine, was) 3 GB larger. ``malloc_trim(0)``
returns the free pages at once (a few milliseconds); other C libraries have no such call and keep
their own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` function, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
