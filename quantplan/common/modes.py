"""File modes of written folders: what the user's umask gives, not ``mkdtemp``'s private 0700.

Checkpoints and caches are written to a temporary folder and renamed into place (atomic). But
``tempfile.mkdtemp`` creates that folder ``drwx------`` and transformers' ``save_pretrained``
writes ``model.safetensors`` ``-rw-------``; renamed as they are, the result is unreadable by
anyone else where every other file the user writes is (umask 022: folders 755, files 644).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc where it is, else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder in ``parent`` (same filesystem, so it can be renamed into place),
    with the mode the umask gives any new folder."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~current_umask())
    return path


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask gives new folders and files
    (files keep their execute bits only where they had them)."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            (Path(folder) / name).chmod(0o777 & ~mask)
        for name in files:
            path = Path(folder) / name
            executable = path.stat().st_mode & 0o111
            path.chmod((0o666 | executable) & ~mask)
