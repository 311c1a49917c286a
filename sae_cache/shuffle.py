"""The on-disk shuffle: shards in stream order in, data files in a uniformly random order out, from the seed.

Owns `shuffle_shards` and the choice of path. Rows (or, across sequences, positions) end in the order of
their seeded keys (sae_cache.shuffle_io), whatever the number of buffers, shards or ranks that produced
the stream. Rows of at least ONE_PASS_MIN_ROW_BYTES (the usual case: a row is context x d_model values)
are shuffled in one pass (here): the whole order is computed from the keys (8 bytes a row) and each output
chunk's rows are read with `os.preadv` straight from the shards into a reused buffer, in file order, so
every byte is read and written once; the rows and their order are the two passes' (only the record-batch
boundaries inside the files differ). Positions across sequences, smaller rows, and bit-packed bool labels
take the two passes through bucket files (sae_cache.shuffle_buckets). The output goes around the page
cache with direct_io (sae_cache/direct_io.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from datasets import Features

from sae_cache.arrow_format import file_offset, mapped_batches
from sae_cache.columns import TOKEN_IDS
from sae_cache.shuffle_buckets import bucket_shuffle
from sae_cache.shuffle_io import Background, RowSink, bytes_per_row, check_files, item_buffers, item_layouts, row_order

ONE_PASS_MIN_ROW_BYTES = 16 << 10  # rows mode reads rows at least this large straight from the shards (one pass)...
ONE_PASS_MAX_ROWS = 8 << 20  # ...when the order of all rows (16 bytes a row while it is computed) stays small


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
    """Write the shuffled cache's data files into out_dir (around the page cache with direct_io); returns
    their names in order."""
    row_bytes = bytes_per_row(features)
    layouts = item_layouts(features, across_sequences)
    sink = RowSink(out_dir, features, n_rows=n_rows, rows_per_file=rows_per_file, direct_io=direct_io)
    if not across_sequences and _one_pass(layouts, row_bytes, n_rows):
        with Background() as background:
            chunk_rows = max(1, bucket_bytes // row_bytes)
            _gather_one_pass(shard_files, sink, layouts, background, seed=seed, n_rows=n_rows, chunk_rows=chunk_rows)
            background.submit(sink.close)
        return check_files(sink)
    per_row = features[TOKEN_IDS].length if across_sequences else 1
    bucket_shuffle(
        shard_files,
        sink,
        layouts,
        seed=seed,
        across=across_sequences,
        per_row=per_row,
        n_items=n_rows * per_row,
        item_bytes=row_bytes // per_row,
        bucket_bytes=bucket_bytes,
        bucket_dir=bucket_dir,
    )
    return check_files(sink)


def _one_pass(layouts, bytes_per_row: int, n_rows: int) -> bool:
    """Whether rows mode takes the one-pass path: large rows, a small order, every column stored in place
    (bool labels are bit-packed in Arrow, so a row's bools cannot be read alone)."""
    in_place = all(dtype != np.bool_ for _, _, dtype in layouts.values())
    return in_place and bytes_per_row >= ONE_PASS_MIN_ROW_BYTES and n_rows <= ONE_PASS_MAX_ROWS


class _RowExtents:
    """Where each stream row's value of each column lies in the shards: file, byte offset, byte size."""

    def __init__(self, shard_files: list[Path], layouts) -> None:
        self.files, self.batch_file, self.offsets, first = list(shard_files), [], [], [0]
        self.row_bytes = {name: per_item * dtype.itemsize for name, (_, per_item, dtype) in layouts.items()}
        for f, path in enumerate(self.files):
            for columns, base in mapped_batches(path):
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


def _offset_in_file(values: np.ndarray, base: int, path: Path) -> int:
    offset = file_offset(values, base, path.stat().st_size)
    if offset is None:
        raise RuntimeError(
            f"a column of {path} is not stored as one contiguous buffer in the file: it cannot be read in place."
        )
    return offset


def _gather_one_pass(
    shard_files, sink: RowSink, layouts, background: Background, *, seed: int, n_rows: int, chunk_rows: int
) -> None:
    """Rows mode in one pass: output rows start..start+chunk_rows-1 are read from the shards (in file
    order, with os.preadv) into one of two alternating buffers and handed to the sink."""
    extents = _RowExtents(shard_files, layouts)
    order = row_order(seed, n_rows)
    buffers = [item_buffers(layouts, min(chunk_rows, n_rows)) for _ in range(2)]
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
