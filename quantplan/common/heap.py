"""Hand the C heap's freed pages back to the operating system: between stages, and when a loop's heap has grown.

glibc's malloc keeps freed memory for reuse once its threshold for direct mappings has grown past a
tensor's size. Two ways that shows: after the Fisher pass of SmolLM2 the process held 4.2 GiB of which
1.1 GiB was alive, so every later stage looked (and, for the rest of the machine, was) 3 GiB larger; and a
loop that makes tensors of ~32 MiB chunk after chunk while small results stay alive between them
fragments the heap, which then grows without bound (the scoreboard's comparison of SmolLM2 on 8 held-out
windows: 4.8 GiB resident, 1.9 GiB of it in use). ``malloc_trim(0)`` returns every free page at once.
:func:`release_freed_memory` runs at each stage's end (:func:`quantplan.common.profile.stage`);
:func:`release_if_grown` is cheap enough for every chunk of a loop (a read of ``/proc/self/statm``) and
trims only when the resident set has grown by :data:`SLACK_BYTES` (256 MiB) since the last trim, so the pages a
trim gives back are faulted in again at most once per that much growth. Forcing big tensors into their
own mappings instead (``M_MMAP_THRESHOLD``) cost 13-15 % more CPU in that comparison, every tensor's
pages faulted in afresh. Other C libraries have no such call and keep their own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

#: resident growth since the last trim that makes :func:`release_if_grown` trim again
SLACK_BYTES = 256 << 20
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_floor: list[int | None] = [None]  # the resident set just after the last trim


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` function, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """The process's resident set now (Linux), else None."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    _floor[0] = resident_bytes()
    return True


def release_if_grown() -> bool:
    """:func:`release_freed_memory` when the resident set grew by :data:`SLACK_BYTES` since the last trim (or since
    the first call); whether it trimmed."""
    if _malloc_trim() is None:
        return False
    now = resident_bytes()
    if now is None:
        return False
    if _floor[0] is None or now < _floor[0]:
        _floor[0] = now
        return False
    if now - _floor[0] < SLACK_BYTES:
        return False
    return release_freed_memory()
