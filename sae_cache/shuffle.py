"""The on-disk shuffle of shards: data files whose rows (or positions) are in a uniformly random order, from the seed.

Owns `shuffle_shards`, used where the shuffle is not written in place (sae_cache.shuffle_in_place writes large
rows straight at their places): positions across sequences, rows under 16 KiB, more than 8M rows, and bool
labels. Rows (or positions) end in the order of their seeded keys (sae_cache.shuffle_io), whatever the number
of buffers, shards or ranks that produced the stream, in two passes over the disk, in memory bounded by a few
buckets:

1. scatter: items go to bucket files by key range (bucket = key // width), in stream order;
2. gather: each bucket is loaded, sorted by key (stably, so ties keep stream order) and appended
   to the output files, rows_per_file rows each.

Concatenating the sorted buckets is the global sort, so the result is a uniform random permutation.
Each pass copies every item once in memory (`np.take` from the shard's memory map, or from the bucket
file's) while the background thread writes. The scatter frees the page cache of the shard bytes it has
read, so that the bucket files (read back at once, so through the page cache) reuse those pages. Memory:
the scatter holds two chunks of SCATTER_CHUNK_BYTES and the memory map of one; the gather the memory map
of one bucket and two sorted buckets (with bucket_bytes a quarter of a buffer, about three quarters of a
buffer). The output goes around the page cache with direct_io (sae_cache/direct_io.py). The bucket files'
names belong to sae_cache.publish, which owns the run's layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Features

from sae_cache.arrow_format import file_offset, mapped_batches, read_arrow_columns
from sae_cache.columns import TOKEN_IDS
from sae_cache.publish import bucket_file, reset_dir
from sae_cache.shuffle_io import (
    KEY_LIMIT,
    Background,
    RowSink,
    as_items,
    bytes_per_row,
    check_files,
    item_buffers,
    item_keys,
    item_layouts,
    take,
)

SCATTER_CHUNK_BYTES = 64 << 20  # items read from a shard at once during the scatter


def shuffle_shards(
    shard_files: list[Path],
    *,
    features: Features,
    seed: int,
    across_sequences: bool,
    rows_per_file: int,
    n_rows: int,
    bucket_dir: Path,
    out_dir: Path,
    bucket_bytes: int,
    direct_io: bool = False,
) -> list[str]:
    """Write the shuffled cache's data files into out_dir (around the page cache with direct_io) through bucket
    files of about bucket_bytes each; returns their names in order."""
    row_bytes = bytes_per_row(features)
    layouts = item_layouts(features, across_sequences)
    sink = RowSink(out_dir, features, n_rows=n_rows, rows_per_file=rows_per_file, direct_io=direct_io)
    per_row = features[TOKEN_IDS].length if across_sequences else 1
    n_items, item_bytes = n_rows * per_row, row_bytes // per_row
    n_buckets = max(1, math.ceil(n_items * item_bytes / max(bucket_bytes, 1)))
    width = min(-(-KEY_LIMIT // n_buckets), KEY_LIMIT - 1)  # keys are < KEY_LIMIT - 1
    reset_dir(bucket_dir)
    with Background() as background:
        counts = _scatter(
            shard_files,
            bucket_dir,
            layouts,
            background,
            seed=seed,
            across=across_sequences,
            width=width,
            n_buckets=n_buckets,
        )
    with Background() as background:
        _gather(bucket_dir, sink, layouts, background, counts=counts, per_row=per_row)
        background.submit(sink.close)
    return check_files(sink)


def _chunks(shard_files: list[Path], across: bool, chunk_items: int) -> Iterator[tuple[Path, int, int, int]]:
    """(shard, batch index, start, stop): the stream's items in chunks of at most chunk_items."""
    for path in shard_files:
        for b, columns in enumerate(read_arrow_columns(path)):
            n_items = len(as_items(columns, across)[TOKEN_IDS])
            for start in range(0, n_items, chunk_items):
                yield path, b, start, min(start + chunk_items, n_items)


def _chunk_items(
    path: Path, batch: int, start: int, stop: int, across: bool
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """Items start..stop-1 of a shard's batch: views on a fresh memory map, unmapped once dropped (bounded
    RSS), and the (offset, length) byte ranges of the file that they are."""
    for i, (columns, base) in enumerate(mapped_batches(path)):
        if i == batch:
            items = {k: v[start:stop] for k, v in as_items(columns, across).items()}
            size = path.stat().st_size
            spans = [(file_offset(v, base, size), v.nbytes) for v in items.values()]
            return items, [(offset, n) for offset, n in spans if offset is not None]  # not copies (bool columns)
    raise IndexError(batch)


def _drop_cached(path: Path, ranges: list[tuple[int, int]]) -> None:
    """Free the page cache of shard bytes the scatter has read (the shard stays on disk): the bucket
    files written next reuse those pages (on a VM, memory left free for long is slow to touch again)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _scatter(
    shard_files,
    bucket_dir: Path,
    layouts,
    background: Background,
    *,
    seed: int,
    across: bool,
    width: int,
    n_buckets: int,
) -> np.ndarray:
    """Append every item to its bucket's files (keys, then one file per column); returns each bucket's item count."""
    item_bytes = sum(per_item * dtype.itemsize for _, per_item, dtype in layouts.values())
    chunk_items = max(1, SCATTER_CHUNK_BYTES // item_bytes)
    buffers = [item_buffers(layouts, chunk_items) for _ in range(2)]
    counts = np.zeros(n_buckets, np.int64)
    position = 0
    for chunk, (path, batch, start, stop) in enumerate(_chunks(shard_files, across, chunk_items)):
        keys = item_keys(seed, position, position + stop - start)
        position += len(keys)
        buckets = keys // width
        order = np.argsort(buckets, kind="stable")
        present, first, sizes = np.unique(buckets[order], return_index=True, return_counts=True)
        counts[present] += sizes
        out = buffers[chunk % 2]  # free: the write of chunk - 2 finished before chunk - 1 was submitted
        items, ranges = _chunk_items(path, batch, start, stop, across)
        take(items, order, out)
        del items  # unmapped, so that the kernel can drop those pages
        _drop_cached(path, ranges)
        files = {"keys": keys[order]} | {str(i): out[name][: len(keys)] for i, name in enumerate(layouts)}
        background.submit(_append_buckets, bucket_dir, files, present, first, first + sizes)
    return counts


def _append_buckets(directory: Path, files: dict[str, np.ndarray], buckets, starts, stops) -> None:
    """Append rows starts[j]..stops[j]-1 of each array to bucket buckets[j]'s file of that array."""
    for bucket, start, stop in zip(buckets, starts, stops):
        for suffix, values in files.items():
            _append(bucket_file(directory, bucket, suffix), values[start:stop])


def _append(path: Path, values: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(values).data)


def _map_bucket_file(path: Path, n_items: int, per_item: int, dtype: np.dtype) -> np.ndarray:
    """A read-only (n_items, per_item) view of a bucket file's memory map (exactly that many bytes, else EOFError)."""
    expected = n_items * per_item * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise EOFError(f"{path} holds {size} bytes, expected {expected}")
    return (
        np.memmap(path, dtype=dtype, mode="r", shape=(n_items, per_item)) if n_items else np.empty((0, per_item), dtype)
    )


def _replace_bucket(bucket_files: list[Path], sink: RowSink, rows: dict[str, np.ndarray]) -> None:
    """Delete a bucket's files, then write its sorted rows. Both on the writing thread: output written
    through the page cache (direct_io off or refused) then reuses the pages just freed (on a VM, memory
    left free for long can be slow to touch again)."""
    for path in bucket_files:
        os.remove(path)
    sink.write(rows)


def _gather(
    bucket_dir: Path, sink: RowSink, layouts, background: Background, *, counts: np.ndarray, per_row: int
) -> None:
    """Sort each bucket by key into one of two alternating buffers and hand its whole rows to the sink.

    Items are packed `per_row` to a row (1 in rows mode); the positions left over after a bucket's
    whole rows are carried to the front of the next buffer.
    """
    buffers = [item_buffers(layouts, int(counts.max()) + per_row - 1) for _ in range(2)]
    carry = 0
    for k, bucket in enumerate(np.flatnonzero(counts)):
        n, out = int(counts[bucket]), buffers[k % 2]
        keys = np.array(_map_bucket_file(bucket_file(bucket_dir, bucket, "keys"), n, 1, np.int64)).reshape(-1)
        source = {
            name: _map_bucket_file(bucket_file(bucket_dir, bucket, str(i)), n, per_item, dtype)
            for i, (name, (_, per_item, dtype)) in enumerate(layouts.items())
        }
        take(source, np.argsort(keys, kind="stable"), out, start=carry)
        del source  # unmapped: the bucket's pages leave this process's memory
        whole = (carry + n) // per_row * per_row
        rows = {name: out[name][:whole].reshape(-1, *shape) for name, (shape, _, _) in layouts.items()}
        background.submit(_replace_bucket, list(bucket_dir.glob(bucket_file(bucket_dir, bucket, "*").name)), sink, rows)
        carry = carry + n - whole
        for name in layouts:  # the other buffer is free now: its write has finished
            buffers[(k + 1) % 2][name][:carry] = out[name][whole : whole + carry]
