"""Small durable-file helpers every disk stage shares: fsync a path, write JSON atomically, read JSON, and the
error a full disk becomes.

`write_json_atomic` writes through a temporary file, fsyncs it and renames it, so a reader (or a
resumed run) sees the old file or the new one, never half of one. `disk_full` turns a write that found no
space (ENOSPC, or EDQUOT: over quota) into a `DiskFullError` that says what is kept and how to resume;
`access_denied` says why a path may not be read or written, in the OS's words.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
RESUME_HINT = "Free some space, then rerun with resume=True."


class DiskFullError(OSError):
    """The disk (or the user's quota) is full: the message says what is kept and how to go on (errno ENOSPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


@contextlib.contextmanager
def disk_full(doing: str, kept: str) -> Iterator[None]:
    """Inside the block, a write that finds the disk full raises DiskFullError: "disk full while {doing}: {kept}.
    Free some space, then rerun with resume=True." (other errors pass unchanged)."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE or isinstance(e, DiskFullError):
            raise
        raise DiskFullError(f"disk full while {doing}: {kept}. {RESUME_HINT}") from e


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to `path` through a temporary file, fsync and rename: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def fsync_path(path: Path) -> None:
    """fsync a file or directory so that its contents (or its entries) survive a crash."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def access_denied(path: Path, mode: int) -> str | None:
    """Why this process may not access `path` in `mode` (os.R_OK, os.W_OK, os.X_OK), in the OS's words (e.g.
    "Permission denied", "Read-only file system"); None when it may."""
    if os.access(path, mode):
        return None
    try:  # os.access gives no reason: libc's access() sets errno
        if ctypes.CDLL(None, use_errno=True).access(os.fsencode(path), mode) != 0:
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError):
        pass
    return "Permission denied"
