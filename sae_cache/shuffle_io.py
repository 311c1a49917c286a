"""What the shuffles share: the seeded keys and order (both), items, their buffers, the writer thread, the sink.

Every item (a row, or a position with its token id) gets a random 63-bit key that depends only on (seed,
its index in the stream), so the order does not depend on how many buffers or shards produced the stream;
the shuffled order is the items sorted by key. Items are moved with `np.take` into buffers reused all along
while `Background` writes (and fsyncs) the previous one on its own thread, into `RowSink`'s data files of
rows_per_file rows each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from datasets import Features

from sae_cache.arrow_format import ArrowFileWriter, data_file_name, feature_row_layout
from sae_cache.columns import TOKEN_IDS

KEY_BLOCK = 1 << 16  # keys are generated in blocks of this many items, each block from (seed, block index)
KEY_LIMIT = 1 << 63


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


def row_order(seed: int, n_rows: int) -> np.ndarray:
    """The shuffled order of n_rows rows: out[j] is the stream row stored j-th (rows sorted stably by key)."""
    return np.argsort(item_keys(seed, 0, n_rows), kind="stable")


def bytes_per_row(features: Features) -> int:
    total = 0
    for feature in features.values():
        shape, dtype = feature_row_layout(feature)
        total += int(np.prod(shape)) * dtype.itemsize
    return total


def item_layouts(features: Features, across: bool) -> dict[str, tuple[tuple[int, ...], int, np.dtype]]:
    """Per column: the shape of one row's value, the values per item, and the dtype."""
    layouts = {}
    for name, feature in features.items():
        shape, dtype = feature_row_layout(feature)
        per_item = int(np.prod(shape[1:])) if across else int(np.prod(shape))
        layouts[name] = (shape, per_item, dtype)
    return layouts


def as_items(columns: dict[str, np.ndarray], across: bool) -> dict[str, np.ndarray]:
    """Columns viewed as one item per row (rows mode) or per position (across sequences), 2-D: across sequences, a
    (rows, positions, d) column gives d values per item, a (rows, positions) one (token ids, scales) one value."""
    if across:
        return {k: v.reshape(-1, v.shape[-1]) if v.ndim == 3 else v.reshape(-1, 1) for k, v in columns.items()}
    return {k: v.reshape(len(v), -1) for k, v in columns.items()}


def item_buffers(layouts, n_items: int) -> dict[str, np.ndarray]:
    """Empty 2-D arrays of n_items items per column, reused across chunks or buckets."""
    return {name: np.empty((n_items, per_item), dtype) for name, (_, per_item, dtype) in layouts.items()}


def take(items: dict[str, np.ndarray], order: np.ndarray, out: dict[str, np.ndarray], start: int = 0) -> None:
    """out[name][start : start + len(order)] = items[name][order], with no temporary (mode="clip" is unbuffered)."""
    for name, values in items.items():
        np.take(values, order, axis=0, out=out[name][start : start + len(order)], mode="clip")


class Background:
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

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._executor.shutdown(wait=True)


class RowSink:
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


def check_files(sink: RowSink) -> list[str]:
    if sink.file_index != sink.n_files:
        raise RuntimeError(
            f"the shuffle wrote {sink.file_index} data files, expected {sink.n_files}: the shards are inconsistent."
        )
    return sink.names
