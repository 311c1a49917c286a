"""The run's on-disk layout, and publishing a finished cache atomically: one module owns both.

A cache at `out` is made in its sibling work directory `<out>.sae_cache-tmp`:

    run.json                     the run record: what the run produces (a resume must produce the same)
    shards/[rank_XXXXX/]         shard_XXXXX.arrow (.partial until complete), then shard_XXXXX.json, its manifest
    buckets/                     the shuffle's bucket files (XXXXXX.keys, XXXXXX.0, XXXXXX.1, ...)
    staging/                     the cache being assembled (the shuffle written in place: from the start)
    layout.json                  the shuffle written in place: staging's data files are laid out
    hub/                         the Parquet export pushed to the Hub

`check_output` refuses an output path a run must not write (a protected directory, a file, a cache or
other files without overwrite, a directory the user cannot write, with the real cause), and
`check_disk_space` a run the free space cannot hold (counting what a resumed run has already written).
`publishing(paths)` hands out a fresh staging directory (or, with fresh=False, the one the shuffle written
in place has filled) and, when the block ends normally, puts it in place (in the manner of datasets'
`incomplete_dir`). Over an existing cache, the swap is one atomic exchange where the OS has it (Linux
renameat2 RENAME_EXCHANGE), so that the output path always holds a complete cache:

    exchange staging <-> out;  remove the old cache (now at staging)

and a backup-and-rename where it has not (ENOSYS, EINVAL, ENOTSUP: other systems, some filesystems):

    out -> out.sae_cache-backup;  staging -> out;  remove backup

Any failure rolls back (the backup is renamed back); `repair_interrupted_swap` finishes or undoes a
backup-and-rename that a killed process left half done (an interrupted exchange leaves the old cache in
the work directory, which the next run removes with it). A cache is complete once its metadata file,
written last by `finish_staging`, is there. Shards become data files without rewriting their bytes (hard links;
copies only where a filesystem has none). Nothing outside `out` and its two siblings is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import Features

from sae_cache.arrow_format import data_file_name, write_dataset_files
from sae_cache.checks import check_output_path, protected_path
from sae_cache.files import DiskFullError, access_denied, fsync_path, read_json, write_json_atomic
from sae_cache.metadata import METADATA_FILE

WORK_SUFFIX = ".sae_cache-tmp"
BACKUP_SUFFIX = ".sae_cache-backup"
DISK_MARGIN = 1.05  # free space asked for beyond the plan's peak
RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}  # the OS or filesystem has no exchange


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

    def written(self, n_buffers: int, bytes_per_row: int) -> tuple[int, int]:
        """Rows and bytes of the complete buffers, from the first: what a resumed run keeps (a buffer written in
        place has no shard file: its rows are in the staged data files)."""
        rows = [self.read_manifest(i)["rows"] for i in range(self.n_complete(n_buffers))]
        shards = [self.shard(i) for i in range(len(rows))]
        size = sum(s.stat().st_size if s.exists() else n * bytes_per_row for s, n in zip(shards, rows))
        return sum(rows), size


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
    """Refuse an output path the run must not write: a protected directory (even with overwrite), a file, a
    cache or other files (without overwrite), an interrupted run's work directory (without resume or
    overwrite), a place the user cannot write. resume=None: the run cannot resume."""
    out = paths.out
    check_output_path(out, field=field, resolve=True)
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
    _check_writable(paths, field)


def _check_writable(paths: RunPaths, field: str) -> None:
    """The run creates `out` and its siblings in out's parent, and moves `out` when it replaces it."""
    anchor = existing_ancestor(paths.out.parent)
    if not anchor.is_dir():
        raise ValueError(f"{field}={str(paths.out)!r} cannot be created: {anchor} is a file, not a directory.")
    for place in (anchor, *([paths.out] if paths.out.is_dir() else [])):
        reason = access_denied(place, os.W_OK | os.X_OK)
        if reason:
            raise ValueError(
                f"{field}={str(paths.out)!r} cannot be written: {place}: {reason}. Choose another path, or make "
                f"{place} writable."
            )


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(out: Path, peak_bytes: int, written_bytes: int = 0) -> None:
    """Refuse a run whose peak disk use, less the bytes a resumed run has already written, exceeds the free space."""
    anchor = existing_ancestor(out)
    free = shutil.disk_usage(anchor).free
    needed = math.ceil(max(peak_bytes - written_bytes, 0) * DISK_MARGIN)
    if free >= needed:
        return
    need, have = _sizes_that_differ(needed, free)
    done = f" (the {written_bytes / 1e9:.3f} GB of shards already written count as done)" if written_bytes else ""
    raise DiskFullError(
        f"not enough disk space at {anchor}: the run needs up to {need} GB more{done}, {have} GB are free. Free "
        "some space, lower training_tokens, use dtype='float16', or choose another new_cached_activations_path."
    )


def _sizes_that_differ(a: int, b: int) -> tuple[str, str]:
    """a and b bytes in GB, with as many decimals as it takes for two different sizes to read differently."""
    for decimals in range(2, 10):
        texts = f"{a / 1e9:.{decimals}f}", f"{b / 1e9:.{decimals}f}"
        if texts[0] != texts[1]:
            return texts
    return texts


def _started_as_overwrite(paths: RunPaths) -> bool:
    """The interrupted run in the work directory was started with overwrite=True."""
    return paths.run_file.exists() and bool(read_json(paths.run_file).get("overwrite"))


def continues_work(paths: RunPaths, identity: dict, *, resume: bool) -> bool:
    """Whether this run continues the work directory there: resume=True and a record of the same output. A work
    directory without a record and without a complete shard is a run that never started (killed between creating
    one and the other): it is started afresh."""
    if not (resume and paths.work.exists()):
        return False
    if not paths.run_file.exists():
        if any(paths.shards.rglob("shard_*.json")):
            raise ValueError(
                f"cannot resume {paths.work}: its run record {paths.run_file.name} is missing although shards "
                "are there. Pass overwrite=True to start over."
            )
        return False
    previous = read_json(paths.run_file)
    fields = identity["fields"]
    changed = sorted(k for k in fields if previous.get("fields", {}).get(k) != fields[k])
    if changed or previous.get("plan") != identity["plan"]:
        raise ValueError(
            f"cannot resume {paths.work}: the configuration changed in {changed or 'the resolved plan'}. "
            "Rerun with the original values, or pass overwrite=True to start over."
        )
    return True


def start_work(paths: RunPaths, identity: dict, *, overwrite: bool, resume: bool) -> None:
    """Create the run's work directory and its record, or (resume) keep the one there if it made the same output."""
    if continues_work(paths, identity, resume=resume):
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
    """Publish `staging` as `out`, atomically replacing an existing cache there: an exchange where the OS has
    one, else a backup-and-rename (with rollback)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or is_empty_dir(out):
        fault_point("install")
        os.replace(staging, out)
        fsync_path(out.parent)
        return
    try:
        fault_point("exchange")
        exchange(staging, out)
    except OSError as e:
        if e.errno not in NO_EXCHANGE:
            raise
        _backup_and_rename(staging, out)
        return
    fsync_path(out.parent)
    fsync_path(staging.parent)
    fault_point("cleanup")
    shutil.rmtree(staging)  # the old cache


def _backup_and_rename(staging: Path, out: Path) -> None:
    backup = RunPaths(out).backup
    fault_point("backup")
    os.rename(out, backup)
    try:
        fault_point("install")
        os.rename(staging, out)
    except BaseException:
        os.rename(backup, out)
        raise
    fsync_path(out.parent)
    fault_point("cleanup")
    shutil.rmtree(backup)


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); an OSError with an
    errno in NO_EXCHANGE where the OS or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system", str(a))
    if renameat2(-100, os.fsencode(a), -100, os.fsencode(b), RENAME_EXCHANGE) != 0:  # -100: AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2():
    """libc's renameat2 (glibc 2.28+, musl 1.2.5+), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2


def repair_interrupted_swap(out: Path) -> str | None:
    """Finish or undo what a killed backup-and-rename left; returns what was done (None when nothing was needed)."""
    if not out.name or protected_path(out, resolve=True):
        return None  # never an output directory: check_output refuses it with the reason
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
