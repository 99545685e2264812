"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Write to a temporary file in the same folder, fsync it, rename it over the target, fsync the
folder (so the rename itself survives a crash). A failure removes the temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_bytes_atomic", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
