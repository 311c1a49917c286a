"""The on-disk shuffle, in memory bounded by a few buckets (about a buffer) whatever the cache size.

Owns turning shards in stream order into data files whose rows (or, across sequences, positions)
are in a uniformly random order, reproducible from the seed. Every item (a row, or a position with
its token id) gets a random 63-bit key that depends only on (seed, its index in the stream), so the
order does not depend on how many buffers or shards produced the stream. The final order is the
items sorted by key, computed in two passes over the disk:

1. scatter: items go to bucket files by key range (bucket = key // width), in stream order;
2. gather: each bucket is loaded, sorted by key (stably, so ties keep stream order) and appended
   to the output files, rows_per_file rows each.

Concatenating the sorted buckets is the global sort, so the result is a uniform random permutation.

Rows of at least ONE_PASS_MIN_ROW_BYTES (the usual case: a row is context x d_model values) are shuffled
in one pass instead (`_gather_one_pass`): the whole order is computed from the keys (8 bytes a row) and
each output chunk's rows are read with `os.preadv` straight from the shards into a reused buffer, in
file order, so every byte is read and written once (no bucket files); the rows and their order are the
two passes' (only the record-batch boundaries inside the files differ).

Speed: each pass copies every item once in memory (`np.take` from the shard's memory map, or from
the bucket file's, into a buffer reused all along) while one background thread writes (and fsyncs)
the previous buffer, so that file I/O overlaps the reordering. The output goes around the page cache
with direct_io (sae_cache/direct_io.py); the scatter frees the page cache of the shard bytes it has
read, so that the bucket files (read back at once, so through the page cache) reuse those pages. Memory: the scatter holds two chunks
of SCATTER_CHUNK_BYTES and the memory map of one; the gather the memory map of one bucket and two sorted
buckets (with bucket_bytes a quarter of a buffer, about three quarters of a buffer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Features

from sae_cache.arrow_format import (
    ArrowFileWriter,
    data_file_name,
    feature_row_layout,
    read_arrow_columns,
    stream_columns,
)
from sae_cache.columns import TOKEN_IDS
from sae_cache.publish import bucket_file, reset_dir

KEY_BLOCK = 1 << 16  # keys are generated in blocks of this many items, each block from (seed, block index)
KEY_LIMIT = 1 << 63
SCATTER_CHUNK_BYTES = 64 << 20  # items read from a shard at once during the scatter
ONE_PASS_MIN_ROW_BYTES = 16 << 10  # rows mode reads rows at least this large straight from the shards (one pass)...
ONE_PASS_MAX_ROWS = 8 << 20  # ...when the order of all rows (16 bytes a row while it is computed) stays small


def item_keys(seed: int, start: int, stop: int) -> np.ndarray:
    """The random keys of stream items start..stop-1 (independent of how the stream was cut)."""
    first, last = start // KEY_BLOCK, (stop - 1) // KEY_BLOCK
    blocks = [
        np.random.default_rng([seed, b]).integers(0, KEY_LIMIT - 1, KEY_BLOCK, dtype=np.int64)
        for b in range(first, last + 1)
    ]
    keys = np.concatenate(blocks) if blocks else np.empty(0, np.int64)
    offset = start - first * KEY_BLOCK
    return keys[offset : offset + stop - start]


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
    """Write the shuffled cache's data files into out_dir (around the page cache with direct_io); returns their names in order."""
    sliced_context_size = features[TOKEN_IDS].length
    bytes_per_row = _bytes_per_row(features)
    layouts = _item_layouts(features, across_sequences)
    if not across_sequences and _one_pass(layouts, bytes_per_row, n_rows):
        sink = _RowSink(out_dir, features, n_rows=n_rows, rows_per_file=rows_per_file, direct_io=direct_io)
        with _Background() as background:
            _gather_one_pass(
                shard_files,
                sink,
                layouts,
                background,
                seed=seed,
                n_rows=n_rows,
                chunk_rows=max(1, bucket_bytes // bytes_per_row),
            )
            background.submit(sink.close)
        return _check_files(sink)
    n_items = n_rows * sliced_context_size if across_sequences else n_rows
    item_bytes = bytes_per_row // sliced_context_size if across_sequences else bytes_per_row
    n_buckets = max(1, math.ceil(n_items * item_bytes / max(bucket_bytes, 1)))
    width = min(-(-KEY_LIMIT // n_buckets), KEY_LIMIT - 1)  # keys are < KEY_LIMIT - 1
    reset_dir(bucket_dir)
    with _Background() as background:
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
    sink = _RowSink(out_dir, features, n_rows=n_rows, rows_per_file=rows_per_file, direct_io=direct_io)
    with _Background() as background:
        _gather(
            bucket_dir, sink, layouts, background, counts=counts, per_row=sliced_context_size if across_sequences else 1
        )
        background.submit(sink.close)
    return _check_files(sink)


def _check_files(sink: _RowSink) -> list[str]:
    if sink.file_index != sink.n_files:
        raise RuntimeError(
            f"the shuffle wrote {sink.file_index} data files, expected {sink.n_files}: the shards are inconsistent."
        )
    return sink.names


def _bytes_per_row(features: Features) -> int:
    total = 0
    for feature in features.values():
        shape, dtype = feature_row_layout(feature)
        total += int(np.prod(shape)) * dtype.itemsize
    return total


def _one_pass(layouts, bytes_per_row: int, n_rows: int) -> bool:
    """Whether rows mode takes the one-pass path: large rows, a small order, every column stored in place
    (bool labels are bit-packed in Arrow, so a row's bools cannot be read alone)."""
    in_place = all(dtype != np.bool_ for _, _, dtype in layouts.values())
    return in_place and bytes_per_row >= ONE_PASS_MIN_ROW_BYTES and n_rows <= ONE_PASS_MAX_ROWS


def _item_layouts(features: Features, across: bool) -> dict[str, tuple[tuple[int, ...], int, np.dtype]]:
    """Per column: the shape of one row's value, the values per item, and the dtype."""
    layouts = {}
    for name, feature in features.items():
        shape, dtype = feature_row_layout(feature)
        per_item = int(np.prod(shape[1:])) if across else int(np.prod(shape))
        layouts[name] = (shape, per_item, dtype)
    return layouts


def _items(columns: dict[str, np.ndarray], across: bool) -> dict[str, np.ndarray]:
    """Columns viewed as one item per row (rows mode) or per position (across sequences), 2-D."""
    if across:
        return {k: v.reshape(-1, v.shape[-1]) if k != TOKEN_IDS else v.reshape(-1, 1) for k, v in columns.items()}
    return {k: v.reshape(len(v), -1) for k, v in columns.items()}


def _item_buffers(layouts, n_items: int) -> dict[str, np.ndarray]:
    """Empty 2-D arrays of n_items items per column, reused across chunks or buckets."""
    return {name: np.empty((n_items, per_item), dtype) for name, (_, per_item, dtype) in layouts.items()}


def _take(items: dict[str, np.ndarray], order: np.ndarray, out: dict[str, np.ndarray], start: int = 0) -> None:
    """out[name][start : start + len(order)] = items[name][order], with no temporary (mode="clip" is unbuffered)."""
    for name, values in items.items():
        np.take(values, order, axis=0, out=out[name][start : start + len(order)], mode="clip")


class _Background:
    """One thread that runs jobs in submission order while the caller prepares the next one.

    `submit` first waits for the previous job and raises its error, so a caller alternating two
    buffers never overwrites the one being written; leaving the `with` block waits for the last job
    (and raises its error unless another is already propagating). At most one job is ever pending.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae_cache-shuffle")
        self._pending: Future | None = None

    def submit(self, job: Callable[..., object], *args) -> None:
        self.wait()
        self._pending = self._executor.submit(job, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._executor.shutdown(wait=True)


def _chunks(shard_files: list[Path], across: bool, chunk_items: int) -> Iterator[tuple[Path, int, int, int]]:
    """(shard, batch index, start, stop): the stream's items in chunks of at most chunk_items."""
    for path in shard_files:
        for b, columns in enumerate(read_arrow_columns(path)):
            n_items = len(_items(columns, across)[TOKEN_IDS])
            for start in range(0, n_items, chunk_items):
                yield path, b, start, min(start + chunk_items, n_items)


def _chunk_items(
    path: Path, batch: int, start: int, stop: int, across: bool
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """Items start..stop-1 of a shard's batch: views on a fresh memory map, unmapped once dropped (bounded
    RSS), and the (offset, length) byte ranges of the file that they are."""
    for i, (columns, base) in enumerate(_batch_columns_with_base(path)):
        if i == batch:
            items = {k: v[start:stop] for k, v in _items(columns, across).items()}
            size = path.stat().st_size
            spans = [(_file_offset(v, base, size), v.nbytes) for v in items.values()]
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
    background: _Background,
    *,
    seed: int,
    across: bool,
    width: int,
    n_buckets: int,
) -> np.ndarray:
    """Append every item to its bucket's files (keys, then one file per column); returns the item count of each bucket."""
    item_bytes = sum(per_item * dtype.itemsize for _, per_item, dtype in layouts.values())
    chunk_items = max(1, SCATTER_CHUNK_BYTES // item_bytes)
    buffers = [_item_buffers(layouts, chunk_items) for _ in range(2)]
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
        _take(items, order, out)
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


class _RowSink:
    """Appends rows to output data files of rows_per_file rows each (the last one trimmed)."""

    def __init__(
        self, out_dir: Path, features: Features, *, n_rows: int, rows_per_file: int, direct_io: bool = False
    ) -> None:
        self.out_dir, self.features, self.direct_io = out_dir, features, direct_io
        self.n_files = math.ceil(n_rows / rows_per_file)
        self.rows_per_file = rows_per_file
        self.names = [data_file_name(i, self.n_files) for i in range(self.n_files)]
        self.file_index = 0
        self.writer: ArrowFileWriter | None = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        start, total = 0, len(columns[TOKEN_IDS])
        while start < total:
            if self.writer is None:
                self.writer = ArrowFileWriter(
                    self.out_dir / self.names[self.file_index], self.features, direct_io=self.direct_io
                )
            take = min(total - start, self.rows_per_file - self.writer.rows)
            self.writer.write({k: v[start : start + take] for k, v in columns.items()})
            start += take
            if self.writer.rows == self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.file_index += 1


def _replace_bucket(bucket_files: list[Path], sink: _RowSink, rows: dict[str, np.ndarray]) -> None:
    """Delete a bucket's files, then write its sorted rows. Both on the writing thread: output written
    through the page cache (direct_io off or refused) then reuses the pages just freed (on a VM, memory
    left free for long can be slow to touch again)."""
    for path in bucket_files:
        os.remove(path)
    sink.write(rows)


def _gather(
    bucket_dir: Path, sink: _RowSink, layouts, background: _Background, *, counts: np.ndarray, per_row: int
) -> None:
    """Sort each bucket by key into one of two alternating buffers and hand its whole rows to the sink.

    Items are packed `per_row` to a row (1 in rows mode); the positions left over after a bucket's
    whole rows are carried to the front of the next buffer.
    """
    buffers = [_item_buffers(layouts, int(counts.max()) + per_row - 1) for _ in range(2)]
    carry = 0
    for k, bucket in enumerate(np.flatnonzero(counts)):
        n, out = int(counts[bucket]), buffers[k % 2]
        keys = np.array(_map_bucket_file(bucket_file(bucket_dir, bucket, "keys"), n, 1, np.int64)).reshape(-1)
        source = {
            name: _map_bucket_file(bucket_file(bucket_dir, bucket, str(i)), n, per_item, dtype)
            for i, (name, (_, per_item, dtype)) in enumerate(layouts.items())
        }
        _take(source, np.argsort(keys, kind="stable"), out, start=carry)
        del source  # unmapped: the bucket's pages leave this process's memory
        whole = (carry + n) // per_row * per_row
        rows = {name: out[name][:whole].reshape(-1, *shape) for name, (shape, _, _) in layouts.items()}
        background.submit(_replace_bucket, list(bucket_dir.glob(bucket_file(bucket_dir, bucket, "*").name)), sink, rows)
        carry = carry + n - whole
        for name in layouts:  # the other buffer is free now: its write has finished
            buffers[(k + 1) % 2][name][:carry] = out[name][whole : whole + carry]


class _RowExtents:
    """Where each stream row's value of each column lies in the shards: file, byte offset, byte size."""

    def __init__(self, shard_files: list[Path], layouts) -> None:
        self.files, self.batch_file, self.offsets, first = list(shard_files), [], [], [0]
        self.row_bytes = {name: per_item * dtype.itemsize for name, (_, per_item, dtype) in layouts.items()}
        for f, path in enumerate(self.files):
            for columns, base in _batch_columns_with_base(path):
                self.batch_file.append(f)
                self.offsets.append({name: _offset_in_file(columns[name], base, path) for name in layouts})
                first.append(first[-1] + len(columns[TOKEN_IDS]))
        self.first = np.array(first, np.int64)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The record batch holding each stream row, and the row's index inside it."""
        batch = np.searchsorted(self.first, rows, side="right") - 1
        if len(rows) and (rows.min() < 0 or rows.max() >= self.first[-1]):
            raise RuntimeError(
                f"the shards hold {self.first[-1]} rows, fewer than the shuffle needs: the shards are inconsistent."
            )
        return batch, rows - self.first[batch]


def _batch_columns_with_base(path: Path) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Each record batch's numpy views, with the address at which the file's memory map starts."""
    source = pa.memory_map(str(path), "r")
    base = source.read_buffer(1).address if source.size() else 0
    source.seek(0)
    for columns in stream_columns(source):
        yield columns, base


def _file_offset(values: np.ndarray, base: int, size: int) -> int | None:
    """Where `values`, a view on a file's memory map starting at `base`, lies in the file; None when it
    is not one contiguous span of it (a copy: bit-packed bools)."""
    offset = values.ctypes.data - base
    return offset if values.flags.c_contiguous and 0 <= offset <= size - values.nbytes else None


def _offset_in_file(values: np.ndarray, base: int, path: Path) -> int:
    offset = _file_offset(values, base, path.stat().st_size)
    if offset is None:
        raise RuntimeError(
            f"a column of {path} is not stored as one contiguous buffer in the file: it cannot be read in place."
        )
    return offset


def _gather_one_pass(
    shard_files, sink: _RowSink, layouts, background: _Background, *, seed: int, n_rows: int, chunk_rows: int
) -> None:
    """Rows mode in one pass: output rows start..start+chunk_rows-1 are read from the shards (in file
    order, with os.preadv) into one of two alternating buffers and handed to the sink."""
    extents = _RowExtents(shard_files, layouts)
    order = np.argsort(item_keys(seed, 0, n_rows), kind="stable")
    buffers = [_item_buffers(layouts, min(chunk_rows, n_rows)) for _ in range(2)]
    for k, start in enumerate(range(0, n_rows, chunk_rows)):
        rows = order[start : start + chunk_rows]
        out = buffers[k % 2]  # free: the write of chunk k - 2 finished before chunk k - 1 was submitted
        _read_rows(extents, rows, {name: values[: len(rows)] for name, values in out.items()})
        background.submit(
            sink.write, {name: out[name][: len(rows)].reshape(-1, *shape) for name, (shape, _, _) in layouts.items()}
        )


def _read_rows(extents: _RowExtents, rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """out[name][i] = the value of stream row rows[i], read from the shards in file order."""
    batch, local = extents.locate(rows)
    by_place = np.lexsort((local, batch))
    fds: dict[int, int] = {}
    try:
        for i in by_place.tolist():
            b, r = int(batch[i]), int(local[i])
            f = extents.batch_file[b]
            fd = fds.get(f)
            if fd is None:
                fd = fds[f] = os.open(extents.files[f], os.O_RDONLY)
            for name, values in out.items():
                size = extents.row_bytes[name]
                if os.preadv(fd, [values[i]], extents.offsets[b][name] + r * size) != size:
                    raise EOFError(
                        f"{extents.files[f]} ended inside row {r} of its record batch {b}: the shards are inconsistent."
                    )
    finally:
        for fd in fds.values():
            os.close(fd)
