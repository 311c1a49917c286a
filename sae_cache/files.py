"""Small durable-file helpers every disk stage shares: fsync a path, write JSON atomically, read JSON.

`write_json_atomic` writes through a temporary file, fsyncs it and renames it, so a reader (or a
resumed run) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


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
