"""Disk layout of a run and publishing a finished cache atomically.

Owns where a run keeps its work (a sibling temporary directory `<out>.sae_cache-tmp` holding the
shards, the shuffle scratch and the staged cache), consolidation of shards into a staged cache
without rewriting activation bytes (hard links; copies only where a filesystem has none), and the
backup-and-rename swap that puts a staged cache in place:

    out -> out.sae_cache-backup;  staging -> out;  remove backup

Any failure rolls back (the backup is renamed back). `repair_interrupted_swap` finishes or undoes a
swap that a killed process left half done. Nothing outside `out` and its two siblings is touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Features

from sae_cache.arrow_format import (
    METADATA_FILE,
    data_file_name,
    fsync_path,
    write_dataset_files,
    write_json_atomic,
)

TMP_SUFFIX = ".sae_cache-tmp"
BACKUP_SUFFIX = ".sae_cache-backup"


def _no_fault(step: str) -> None:
    """Called before every step of the swap; tests replace it to inject a failure there."""


fault_point: Callable[[str], None] = _no_fault


@dataclass(frozen=True)
class RunPaths:
    """Every path a run may create, all inside `out` or one of its two siblings."""

    out: Path

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + TMP_SUFFIX)

    @property
    def backup(self) -> Path:
        return self.out.with_name(self.out.name + BACKUP_SUFFIX)

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def scratch(self) -> Path:
        return self.work / "shuffle"

    @property
    def run_file(self) -> Path:
        return self.work / "run.json"


def is_complete_cache(path: Path) -> bool:
    """A directory that a finished run published (its metadata file is written last)."""
    return (path / METADATA_FILE).is_file()


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def link_or_copy(src: Path, dst: Path) -> None:
    """Give the bytes of `src` a second name `dst`: a hard link (no bytes rewritten), or a copy where the
    filesystem has no hard links. Never a move: the shard must stay until the cache is published."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_path(dst)


def stage_shards(shard_files: list[Path], staging: Path) -> list[str]:
    """Make `staging` a fresh directory whose data files are the shards, in order, without copying bytes."""
    reset_dir(staging)
    names = [data_file_name(i, len(shard_files)) for i in range(len(shard_files))]
    for src, name in zip(shard_files, names, strict=True):
        link_or_copy(src, staging / name)
    return names


def finish_staging(staging: Path, features: Features, file_names: list[str], fingerprint: str, metadata: dict) -> None:
    """Write datasets' files, then our metadata last: its presence marks the cache complete."""
    write_dataset_files(staging, features, file_names, fingerprint)
    write_json_atomic(staging / METADATA_FILE, metadata)
    fsync_path(staging)


def swap_into_place(staging: Path, out: Path) -> None:
    """Publish `staging` as `out`, atomically replacing an existing cache there (with rollback)."""
    paths = RunPaths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or is_empty_dir(out):
        fault_point("install")
        os.replace(staging, out)
        fsync_path(out.parent)
        return
    fault_point("backup")
    os.rename(out, paths.backup)
    try:
        fault_point("install")
        os.rename(staging, out)
    except BaseException:
        os.rename(paths.backup, out)
        raise
    fsync_path(out.parent)
    fault_point("cleanup")
    shutil.rmtree(paths.backup)


def repair_interrupted_swap(out: Path) -> str | None:
    """Finish or undo what a killed swap left; returns what was done (None when nothing was needed)."""
    backup = RunPaths(out).backup
    if not backup.exists():
        return None
    if out.exists() and is_complete_cache(out):
        shutil.rmtree(backup)
        return f"removed {backup} left by a finished swap"
    if out.exists() and not is_empty_dir(out):
        raise RuntimeError(
            f"both {out} (incomplete) and the backup {backup} exist: inspect them and remove the one you do not want."
        )
    if out.exists():
        out.rmdir()
    os.rename(backup, out)
    return f"restored the previous cache from {backup}"


def reset_dir(path: Path) -> None:
    """An empty directory at `path` (only ever called on paths inside the run's work directory)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def remove_work(paths: RunPaths) -> None:
    """Remove the run's temporary directory once the cache is published."""
    if paths.work.exists():
        shutil.rmtree(paths.work)
