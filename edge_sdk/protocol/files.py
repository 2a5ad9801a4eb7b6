"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target; owner-only modes.

A crash at any point leaves either the old file or the new one, never a torn mix:
``os.replace`` is atomic on POSIX file systems, and the directory is fsynced so the
rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def private(path: Path) -> None:
    """Owner-only access (0600) to a file holding secrets, tightened if an older one was created wider."""
    path = Path(path)
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
