"""Atomic writes: a file or folder appears whole under its name, or not at all.

Everything is written under a temporary name beside its target (same folder, so the same file
system) and renamed into place with ``os.replace``, which is atomic: a process killed at any
instant (SIGKILL included) leaves the old file or the new one, never half of one. A write that
fails removes its temporary file. Temporary names are ``<name>.tmp`` (files) and
``.tmp-<random>`` (folders); a staged folder and all it holds get the modes the umask gives
(:mod:`quantplan.common.modes`), as a plain write would.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .modes import apply_umask, staging_dir


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path`` atomically.

    For writers that take a path (``save_file``, ``DataFrame.to_parquet``, ``to_csv``). On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see module docstring); returns ``path``."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see module docstring); returns ``path``."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it is renamed to ``target``.

    First writer wins: if ``target`` exists by then (another process finished first), the
    staged copy is discarded and ``target`` kept. On an exception the staged folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target.parent, prefix=".tmp-")
    try:
        yield tmp
        apply_umask(tmp)  # e.g. save_pretrained writes model.safetensors 0600
        if target.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
