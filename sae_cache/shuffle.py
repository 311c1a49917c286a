"""The on-disk shuffle, in memory bounded by about half a buffer whatever the cache size.

Owns turning shards in stream order into data files whose rows (or, across sequences, positions)
are in a uniformly random order, reproducible from the seed. Every item (a row, or a position with
its token id) gets a random 63-bit key that depends only on (seed, its index in the stream), so the
order does not depend on how many buffers or shards produced the stream. The final order is the
items sorted by key, computed in two passes over the disk:

1. scatter: items go to bucket files by key range (bucket = key // width), in stream order;
2. gather: each bucket is loaded, sorted by key (stably, so ties keep stream order) and appended
   to the output files, rows_per_file rows each.

Concatenating the sorted buckets is the global sort, so the result is a uniform random permutation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Features

from sae_cache.arrow_format import TOKEN_IDS, ArrowFileWriter, data_file_name, feature_row_layout, read_arrow_columns
from sae_cache.consolidate import reset_dir

KEY_BLOCK = 1 << 16  # keys are generated in blocks of this many items, each block from (seed, block index)
KEY_LIMIT = 1 << 63
SCATTER_CHUNK_BYTES = 64 << 20  # items read from a shard at once during the scatter


def item_keys(seed: int, start: int, stop: int) -> np.ndarray:
    """The random keys of stream items start..stop-1 (independent of how the stream was cut)."""
    first, last = start // KEY_BLOCK, (stop - 1) // KEY_BLOCK
    blocks = [np.random.default_rng([seed, b]).integers(0, KEY_LIMIT - 1, KEY_BLOCK, dtype=np.int64) for b in range(first, last + 1)]
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
    scratch: Path,
    out_dir: Path,
    bucket_bytes: int,
) -> list[str]:
    """Write the shuffled cache's data files into out_dir; returns their names in order."""
    length = features[TOKEN_IDS].length
    bytes_per_row = _bytes_per_row(features)
    n_items = n_rows * length if across_sequences else n_rows
    item_bytes = bytes_per_row // length if across_sequences else bytes_per_row
    n_buckets = max(1, math.ceil(n_items * item_bytes / max(bucket_bytes, 1)))
    width = min(-(-KEY_LIMIT // n_buckets), KEY_LIMIT - 1)  # keys are < KEY_LIMIT - 1
    reset_dir(scratch)
    _scatter(shard_files, scratch, features, seed=seed, across=across_sequences, width=width, item_bytes=item_bytes)
    return _gather(scratch, out_dir, features, n_buckets=n_buckets, n_rows=n_rows, rows_per_file=rows_per_file, across=across_sequences)


def _bytes_per_row(features: Features) -> int:
    total = 0
    for feature in features.values():
        shape, dtype = feature_row_layout(feature)
        total += int(np.prod(shape)) * dtype.itemsize
    return total


def _items(columns: dict[str, np.ndarray], across: bool) -> dict[str, np.ndarray]:
    """Columns viewed as one item per row (rows mode) or per position (across sequences), 2-D."""
    if across:
        return {k: v.reshape(-1, v.shape[-1]) if k != TOKEN_IDS else v.reshape(-1, 1) for k, v in columns.items()}
    return {k: v.reshape(len(v), -1) for k, v in columns.items()}


def _shard_item_chunks(path: Path, across: bool, item_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Items of one shard in chunks of about SCATTER_CHUNK_BYTES, each from a fresh memory map (bounded RSS)."""
    n_batches = sum(1 for _ in read_arrow_columns(path))
    for b in range(n_batches):
        n_items = len(next(v for v in _items(_nth_batch(path, b), across).values()))
        step = max(1, SCATTER_CHUNK_BYTES // item_bytes)
        for start in range(0, n_items, step):
            items = _items(_nth_batch(path, b), across)
            yield {k: np.array(v[start : start + step]) for k, v in items.items()}


def _nth_batch(path: Path, index: int) -> dict[str, np.ndarray]:
    for i, columns in enumerate(read_arrow_columns(path)):
        if i == index:
            return columns
    raise IndexError(index)


def _scatter(shard_files, scratch: Path, features: Features, *, seed: int, across: bool, width: int, item_bytes: int) -> None:
    names = list(features)
    position = 0
    for path in shard_files:
        for items in _shard_item_chunks(path, across, item_bytes):
            count = len(items[TOKEN_IDS])
            keys = item_keys(seed, position, position + count)
            position += count
            buckets = keys // width
            order = np.argsort(buckets, kind="stable")
            bounds = np.searchsorted(buckets[order], np.arange(buckets.max() + 2))
            for bucket in np.unique(buckets):
                sel = order[bounds[bucket] : bounds[bucket + 1]]
                _append(scratch / f"{bucket:06d}.keys", keys[sel])
                for i, name in enumerate(names):
                    _append(scratch / f"{bucket:06d}.{i}", items[name][sel])


def _append(path: Path, values: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(values).data)


class _RowSink:
    """Appends rows to output data files of rows_per_file rows each (the last one trimmed)."""

    def __init__(self, out_dir: Path, features: Features, *, n_rows: int, rows_per_file: int) -> None:
        self.out_dir, self.features = out_dir, features
        self.n_files = math.ceil(n_rows / rows_per_file)
        self.rows_per_file = rows_per_file
        self.names = [data_file_name(i, self.n_files) for i in range(self.n_files)]
        self.file_index = 0
        self.writer: ArrowFileWriter | None = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        start, total = 0, len(columns[TOKEN_IDS])
        while start < total:
            if self.writer is None:
                self.writer = ArrowFileWriter(self.out_dir / self.names[self.file_index], self.features)
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


def _gather(scratch: Path, out_dir: Path, features: Features, *, n_buckets: int, n_rows: int, rows_per_file: int, across: bool) -> list[str]:
    names = list(features)
    length = features[TOKEN_IDS].length
    layouts = {name: feature_row_layout(features[name]) for name in names}
    sink = _RowSink(out_dir, features, n_rows=n_rows, rows_per_file=rows_per_file)
    carry: dict[str, np.ndarray] | None = None
    for bucket in range(n_buckets):
        key_path = scratch / f"{bucket:06d}.keys"
        if not key_path.exists():
            continue
        order = np.argsort(np.fromfile(key_path, dtype=np.int64), kind="stable")
        items = {}
        for i, name in enumerate(names):
            flat = np.fromfile(scratch / f"{bucket:06d}.{i}", dtype=layouts[name][1])
            items[name] = flat.reshape(len(order), -1)[order]
        for path in scratch.glob(f"{bucket:06d}.*"):
            os.remove(path)
        if across:
            items, carry = _pack_positions(items, carry, length)
        sink.write({name: items[name].reshape(-1, *layouts[name][0]) for name in names})
    sink.close()
    if sink.file_index != sink.n_files:
        raise RuntimeError(f"the shuffle wrote {sink.file_index} data files, expected {sink.n_files}: the shards are inconsistent.")
    return sink.names


def _pack_positions(items: dict[str, np.ndarray], carry: dict[str, np.ndarray] | None, length: int):
    """Prepend the positions carried from the last bucket; return whole rows' worth and the new carry."""
    if carry is not None:
        items = {k: np.concatenate([carry[k], v]) for k, v in items.items()}
    whole = len(items[TOKEN_IDS]) // length * length
    return {k: v[:whole] for k, v in items.items()}, {k: v[whole:] for k, v in items.items()}
