"""The run's on-disk layout, and publishing a finished cache atomically: one module owns both.

A cache at `out` is made in its sibling work directory `<out>.sae_cache-tmp`:

    run.json                     the run record: what the run produces (a resume must produce the same)
    shards/[rank_XXXXX/]         shard_XXXXX.arrow (.partial until complete), then shard_XXXXX.json, its manifest
    buckets/                     the shuffle's bucket files (XXXXXX.keys, XXXXXX.0, XXXXXX.1, ...)
    staging/                     the cache being assembled (the shuffle written in place: from the start)
    layout.json                  the shuffle written in place: staging's data files are laid out
    hub/                         the Parquet export pushed to the Hub

`check_output` refuses an output path a run must not replace. `publishing(paths)` hands out a fresh
staging directory (or, with fresh=False, the one the shuffle written in place has filled) and, when the
block ends normally, puts it in place with a backup-and-rename swap (in the manner of datasets'
`incomplete_dir`):

    out -> out.sae_cache-backup;  staging -> out;  remove backup

Any failure rolls back (the backup is renamed back); `repair_interrupted_swap` finishes or undoes a
swap that a killed process left half done. A cache is complete once its metadata file, written last
by `finish_staging`, is there. Shards become data files without rewriting their bytes (hard links;
copies only where a filesystem has none). Nothing outside `out` and its two siblings is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import Features

from sae_cache.arrow_format import data_file_name, write_dataset_files
from sae_cache.files import fsync_path, read_json, write_json_atomic
from sae_cache.metadata import METADATA_FILE

WORK_SUFFIX = ".sae_cache-tmp"
BACKUP_SUFFIX = ".sae_cache-backup"


def _no_fault(step: str) -> None:
    """Called before every step of the swap; tests replace it to inject a failure there."""


fault_point: Callable[[str], None] = _no_fault


@dataclass(frozen=True)
class ShardFiles:
    """The shards of one rank: `shard_XXXXX.arrow` (written as `.partial`), then its manifest `shard_XXXXX.json`."""

    directory: Path

    def shard(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.arrow"

    def partial(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.arrow.partial"

    def manifest(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.json"

    def n_complete(self, n_buffers: int) -> int:
        """How many shards, from the first, are complete (have a manifest)."""
        done = 0
        while done < n_buffers and self.manifest(done).exists():
            done += 1
        return done

    def read_manifest(self, index: int) -> dict:
        return read_json(self.manifest(index))


@dataclass(frozen=True)
class RunPaths:
    """Every path a run may create, all inside `out` or one of its two siblings."""

    out: Path

    work = property(lambda self: self.out.with_name(self.out.name + WORK_SUFFIX))
    backup = property(lambda self: self.out.with_name(self.out.name + BACKUP_SUFFIX))
    run_file = property(lambda self: self.work / "run.json")
    shards = property(lambda self: self.work / "shards")
    buckets = property(lambda self: self.work / "buckets")
    staging = property(lambda self: self.work / "staging")
    layout = property(lambda self: self.work / "layout.json")
    hub = property(lambda self: self.work / "hub")

    def shard_files(self, rank: int | None = None) -> ShardFiles:
        """The shards of one process (rank None), or of rank `rank` of several."""
        return ShardFiles(self.shards if rank is None else self.shards / f"rank_{rank:05d}")


def bucket_file(buckets: Path, bucket: int, part: str) -> Path:
    """One part of a shuffle bucket: its keys ("keys") or the values of one column (the column's index)."""
    return buckets / f"{bucket:06d}.{part}"


def is_complete_cache(path: Path) -> bool:
    """A directory that a finished run published (its metadata file is written last)."""
    return (path / METADATA_FILE).is_file()


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# -- before a run ------------------------------------------------------------------------------------


def check_output(paths: RunPaths, *, field: str, overwrite: bool, resume: bool | None) -> None:
    """Refuse an output path the run must not write: a file, a cache or other files (without overwrite),
    an interrupted run's work directory (without resume or overwrite). resume=None: the run cannot resume."""
    out = paths.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"{field}={str(out)!r} is a file: choose a directory path.")
    if out.exists() and not is_empty_dir(out) and not (overwrite or (resume and _started_as_overwrite(paths))):
        what = "a finished cache" if is_complete_cache(out) else "other files"
        raise ValueError(f"{out} already holds {what}: pass overwrite=True to replace it, or choose another path.")
    if paths.work.exists() and not (resume or overwrite):
        fix = "pass overwrite=True to start over"
        if resume is not None:
            fix = "pass resume=True to continue it or overwrite=True to start over"
        raise ValueError(f"{paths.work} holds an interrupted run: {fix}.")


def _started_as_overwrite(paths: RunPaths) -> bool:
    """The interrupted run in the work directory was started with overwrite=True."""
    return paths.run_file.exists() and bool(read_json(paths.run_file).get("overwrite"))


def start_work(paths: RunPaths, identity: dict, *, overwrite: bool, resume: bool) -> None:
    """Create the run's work directory and its record, or (resume) check that the one there made the same output."""
    if paths.work.exists() and resume:
        previous = read_json(paths.run_file) if paths.run_file.exists() else {}
        fields = identity["fields"]
        changed = sorted(k for k in fields if previous.get("fields", {}).get(k) != fields[k])
        if changed or previous.get("plan") != identity["plan"]:
            raise ValueError(
                f"cannot resume {paths.work}: the configuration changed in {changed or 'the resolved plan'}. "
                "Rerun with the original values, or pass overwrite=True to start over."
            )
        return
    reset_dir(paths.work)
    paths.shards.mkdir()
    write_json_atomic(paths.run_file, {**identity, "overwrite": overwrite})


# -- publishing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def publishing(paths: RunPaths, *, fresh: bool = True) -> Iterator[Path]:
    """A fresh staging directory to fill (fresh=False: the one already filled, kept for a resume if the block
    raises); when the block ends normally the staged cache (completed by `finish_staging`) replaces paths.out
    atomically; when it raises, a fresh staging directory is removed."""
    if fresh:
        reset_dir(paths.staging)
    try:
        yield paths.staging
    except BaseException:
        if fresh:
            shutil.rmtree(paths.staging, ignore_errors=True)
        raise
    if not is_complete_cache(paths.staging):
        raise RuntimeError(f"{paths.staging} was never completed (no {METADATA_FILE}): nothing was published.")
    swap_into_place(paths.staging, paths.out)


def link_shards(shard_files: list[Path], staging: Path) -> list[str]:
    """Give every shard, in order, its data-file name in `staging` without copying bytes; returns the names."""
    names = [data_file_name(i, len(shard_files)) for i in range(len(shard_files))]
    for src, name in zip(shard_files, names, strict=True):
        link_or_copy(src, staging / name)
    return names


def link_or_copy(src: Path, dst: Path) -> None:
    """Give the bytes of `src` a second name `dst`: a hard link (no bytes rewritten), or a copy where the
    filesystem has no hard links. Never a move: the shard must stay until the cache is published."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_path(dst)


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
    """Remove the run's work directory once the cache is published (or a run that cannot resume failed)."""
    if paths.work.exists():
        shutil.rmtree(paths.work)
