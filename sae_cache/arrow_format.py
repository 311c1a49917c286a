"""The on-disk layout that `datasets.load_from_disk` opens: one module owns it.

A cache directory holds `data-XXXXX-of-NNNNN.arrow` files (Arrow IPC streams whose schema carries datasets'
`huggingface` metadata), `state.json`, `dataset_info.json` (and our metadata file, which datasets ignores:
sae_cache.metadata). Activations are datasets' `Array2D(shape=(sliced_context_size, d), dtype)` columns, one per
hook, or the columns of a compact storage format (sae_cache.storage_formats: uint16 bfloat16 patterns, int8 values
and a `Sequence(Value("float32"))` of scales), which `dataset_info.json`'s description names; token ids are a
`Sequence(Value("int32"), length=sliced_context_size)` column; position-targeted caches add
variable-length token ids, positions, a source index and labels. Files are written with pyarrow directly from the
arrays' memory (no per-element Python work, no extra full copy) and read back zero-copy from memory maps. The round
trip through `datasets.load_from_disk` is tested in tests/test_arrow_format.py.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Array2D, Features, Sequence, Value
from datasets.features.features import Array2DExtensionType, List, get_nested_type

from sae_cache.columns import POSITIONS, SOURCE_INDEX, TOKEN_IDS
from sae_cache.direct_io import DirectFile
from sae_cache.files import fsync_path, write_json_atomic
from sae_cache.storage_formats import compact_description, formats_of, storage_format

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"


def cache_features(
    hook_dims: dict[str, int], sliced_context_size: int, dtype: str, labels: dict[str, str] | None = None
) -> Features:
    """The datasets Features of a cache: the column(s) of each hook in the storage format of `dtype` (an Array2D of
    values, and for int8 a sequence of scales), token_ids, then numeric label columns."""
    fmt = storage_format(dtype)
    columns: dict = {}
    for hook, d in hook_dims.items():
        for name, (shape, column_dtype) in fmt.columns(hook, d).items():
            columns[name] = (
                Array2D(shape=(sliced_context_size, *shape), dtype=column_dtype)
                if shape
                else Sequence(Value(column_dtype), length=sliced_context_size)
            )
    columns[TOKEN_IDS] = Sequence(Value("int32"), length=sliced_context_size)
    columns.update({name: Value(label_dtype) for name, label_dtype in (labels or {}).items()})
    return Features(columns)


def feature_row_layout(feature) -> tuple[tuple[int, ...], np.dtype]:
    """Shape of one row's value and its numpy dtype, for every column type of a cache."""
    if isinstance(feature, Array2D):
        return tuple(feature.shape), np.dtype(feature.dtype)
    if isinstance(feature, Value):
        return (), np.dtype(feature.dtype)
    return (feature.length,), np.dtype(feature.feature.dtype)


def data_file_name(index: int, count: int) -> str:
    """datasets' name for file `index` of `count`."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


def _array2d(values: np.ndarray, dtype: str) -> pa.ExtensionArray:
    """An Array2D extension array over `values` (rows, length, d) without copying the values."""
    rows, length, d = values.shape
    flat = pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * length * d + 1, d, dtype=np.int32)), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * length + 1, length, dtype=np.int32)), inner)
    return pa.ExtensionArray.from_storage(Array2DExtensionType((length, d), dtype), outer)


def _fixed_list_array(values: np.ndarray) -> pa.FixedSizeListArray:
    """A fixed-length list column (token ids, scales) over `values` (rows, length) without copying them."""
    rows, length = values.shape
    flat = pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
    return pa.FixedSizeListArray.from_arrays(flat, length)


def record_batch(features: Features, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    """A record batch of `columns` (C-contiguous numpy arrays in the cache's dtypes), zero-copy."""
    arrays = []
    for name, feature in features.items():
        values = np.ascontiguousarray(columns[name])
        if isinstance(feature, List):
            arrays.append(_fixed_list_array(values.astype(feature.feature.dtype, copy=False)))
        elif isinstance(feature, Value):
            arrays.append(pa.array(values.reshape(-1), type=feature.pa_type))
        else:
            arrays.append(_array2d(values.astype(feature.dtype, copy=False), feature.dtype))
    return pa.RecordBatch.from_arrays(arrays, schema=features.arrow_schema)


class ArrowFileWriter:
    """Writes record batches to one Arrow IPC stream file; `close()` flushes and fsyncs it.

    direct_io=True writes around the page cache where the filesystem allows (sae_cache/direct_io.py):
    for final data files, not for files read back soon. The bytes are the same either way.
    """

    def __init__(self, path: Path, features: Features, *, direct_io: bool = False) -> None:
        self.path = Path(path)
        self.features = features
        self._sink = DirectFile(self.path) if direct_io else pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, features.arrow_schema)
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        """Append `columns` (numpy arrays in the cache's dtypes) as one record batch."""
        self.write_batch(record_batch(self.features, columns))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        if not isinstance(self._sink, DirectFile):  # DirectFile fsyncs its own descriptor
            fsync_path(self.path)


@dataclass(frozen=True)
class FileLayout:
    """Where the values of each row lie in a data file laid out by `lay_out_file` (record batches of
    `rows_per_batch` rows, the last one trimmed)."""

    size: int  # the file's length in bytes
    rows_per_batch: int
    columns: tuple[str, ...]  # the features' names, in order
    value_offsets: np.ndarray  # [record batch, column]: file offset of the column's first value in the batch
    row_bytes: np.ndarray  # [column]: bytes of one row's value

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        """[row, column]: the file offset of each row's value of each column (columns in the features' order)."""
        batch, within = np.divmod(rows, self.rows_per_batch)
        return self.value_offsets[batch] + within[:, None] * self.row_bytes


def lay_out_file(features: Features, batch_rows: list[int], fd: int | None = None) -> FileLayout:
    """The byte layout of a data file of record batches of `batch_rows` rows, taken from pyarrow's own IPC writer.

    The record batches' values are views on an untouched anonymous memory map (no memory is used for them);
    the sink notes where each lands in the file instead of writing it, and writes every other byte (schema,
    batch headers, list offsets, padding) to `fd` at its place when a descriptor is given. The file is then
    truncated to its full length: the values are a hole, filled later with positioned writes. Written with the
    rows, the file has the bytes `ArrowFileWriter` writes for the same record batches.
    """
    row_shapes = {name: feature_row_layout(feature) for name, feature in features.items()}
    row_bytes = {name: int(np.prod(shape)) * dtype.itemsize for name, (shape, dtype) in row_shapes.items()}
    sizes = {name: -(-max(batch_rows) * n // 64) * 64 for name, n in row_bytes.items()}
    region = mmap.mmap(-1, max(sum(sizes.values()), 1))  # anonymous: never written, so never in memory
    views, start = {}, 0
    for name, (shape, dtype) in row_shapes.items():
        count = max(batch_rows) * int(np.prod(shape))
        views[name] = np.frombuffer(region, dtype, count, start).reshape(max(batch_rows), *shape)
        start += sizes[name]
    sink = _LayoutSink(fd, {values.ctypes.data: (name, row_bytes[name]) for name, values in views.items()})
    writer = pa.ipc.new_stream(sink, features.arrow_schema)
    for rows in batch_rows:
        sink.batches.append({})
        sink.rows = rows
        writer.write_batch(record_batch(features, {name: values[:rows] for name, values in views.items()}))
        if len(sink.batches[-1]) != len(views):
            missing = sorted(set(views) - set(sink.batches[-1]))
            raise RuntimeError(f"the values of column(s) {missing} are copied by pyarrow: they cannot be placed.")
    writer.close()
    if fd is not None:
        os.ftruncate(fd, sink.pos)
    offsets = np.array([[batch[name] for name in views] for batch in sink.batches], np.int64)
    return FileLayout(
        sink.pos,
        batch_rows[0],
        tuple(views),
        offsets.reshape(len(batch_rows), len(views)),
        np.array(list(row_bytes.values()), np.int64),
    )


class _LayoutSink:
    """A write-only file for pyarrow's IPC writer that records where value buffers (known by their address) land,
    skips them, and writes everything else to a descriptor (or nowhere)."""

    closed = False

    def __init__(self, fd: int | None, columns: dict[int, tuple[str, int]]) -> None:
        self.fd, self.pos = fd, 0
        self.columns = columns  # address of a column's values -> (its name, bytes of one row's value)
        self.batches: list[dict[str, int]] = []  # per record batch: column -> file offset of its values
        self.rows = 0  # rows of the record batch being written

    def write(self, data) -> int:
        view = memoryview(data)
        name, row_bytes = self.columns.get(data.address, (None, 0)) if isinstance(data, pa.Buffer) else (None, 0)
        if name is not None and view.nbytes:
            if view.nbytes != self.rows * row_bytes:
                raise RuntimeError(f"pyarrow wrote the values of {name!r} in parts: they cannot be placed.")
            self.batches[-1][name] = self.pos
        elif self.fd is not None:
            done = 0
            while done < view.nbytes:
                done += os.pwrite(self.fd, view[done:], self.pos + done)
        self.pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def read_arrow_columns(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Yield each record batch of an Arrow file as numpy views on its memory map (no copy).

    Activation columns come out as (rows, length, d) arrays, token_ids as (rows, length) int32.
    The views keep the memory map alive; drop them to release it.
    """
    yield from stream_columns(pa.memory_map(str(path), "r"))


def stream_columns(source: pa.NativeFile) -> Iterator[dict[str, np.ndarray]]:
    """Each record batch of the Arrow stream `source` as numpy views (zero-copy on a memory map)."""
    for batch in pa.ipc.open_stream(source):
        yield {name: _column_view(batch.column(i)) for i, name in enumerate(batch.schema.names)}


def _column_view(array: pa.Array) -> np.ndarray:
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    rows = len(array)
    if not pa.types.is_list(array.type) and not pa.types.is_fixed_size_list(array.type):
        return array.to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(array.type):
        return array.flatten().to_numpy(zero_copy_only=True).reshape(rows, -1)
    inner = array.flatten()
    values = inner.flatten().to_numpy(zero_copy_only=True)
    length = len(inner) // rows if rows else 0
    return values.reshape(rows, length, -1)


def mapped_batches(path: Path) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Each record batch's numpy views, with the address at which the file's memory map starts."""
    source = pa.memory_map(str(path), "r")
    base = source.read_buffer(1).address if source.size() else 0
    source.seek(0)
    for columns in stream_columns(source):
        yield columns, base


def file_offset(values: np.ndarray, base: int, size: int) -> int | None:
    """Where `values`, a view on a file's memory map starting at `base`, lies in the file; None when it
    is not one contiguous span of it (a copy: bit-packed bools)."""
    offset = values.ctypes.data - base
    return offset if values.flags.c_contiguous and 0 <= offset <= size - values.nbytes else None


def write_dataset_files(directory: Path, features: Features, file_names: list[str], fingerprint: str) -> None:
    """Write datasets' `state.json` and `dataset_info.json` for the listed data files (metadata last); the
    description says how compact columns are decoded (`datasets.load_from_disk(...).info.description`)."""
    state = {
        "_data_files": [{"filename": name} for name in file_names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    description = compact_description(formats_of(features.to_dict()))  # empty for SAELens's plain format
    info = {"citation": "", "description": description, "features": features.to_dict(), "homepage": "", "license": ""}
    write_json_atomic(directory / INFO_FILE, info)
    write_json_atomic(directory / STATE_FILE, state)


def fingerprint_of(payload: dict) -> str:
    """A 16-hex-digit fingerprint of a JSON-able payload (what datasets uses to key its caches)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- Row-per-prompt caches (position-targeted caching, sae_cache/targeted.py) -------------------
# Extra column kinds beside the Array2D activations: variable-length int32 token ids, fixed-length
# int32 position lists, scalar Values, and label columns of any datasets Features given already in
# Arrow form (taken from the input dataset's table).


def targeted_features(hook_dims: dict[str, int], n_positions: int, dtype: str, labels: Features) -> Features:
    """Features of a targeted cache: token_ids (any length), positions, one Array2D per hook, source_index, labels."""
    columns: dict = {TOKEN_IDS: Sequence(Value("int32")), POSITIONS: Sequence(Value("int32"), length=n_positions)}
    columns.update({hook: Array2D(shape=(n_positions, d), dtype=dtype) for hook, d in hook_dims.items()})
    columns[SOURCE_INDEX] = Value("int64")
    columns.update(labels)
    return Features(columns)


def ragged_int32_array(rows: list[np.ndarray]) -> pa.ListArray:
    """A variable-length int32 list column (datasets `Sequence(Value("int32"))`) holding `rows`."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def mixed_record_batch(features: Features, columns: dict) -> pa.RecordBatch:
    """A record batch of `columns` whose values are numpy arrays, lists of 1-D int arrays, or Arrow arrays.

    Array2D columns take (rows, length, d) arrays and fixed-length int32 sequences (rows, length)
    arrays, both zero-copy as in `record_batch`; a variable-length int32 sequence takes a list of 1-D
    arrays; a scalar Value takes a 1-D array; an Arrow array (any feature) is cast to the feature's type.
    """
    arrays = [_column_array(feature, columns[name]) for name, feature in features.items()]
    return pa.RecordBatch.from_arrays(arrays, schema=features.arrow_schema)


def _column_array(feature, values) -> pa.Array:
    arrow_type = get_nested_type(feature)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == arrow_type else values.cast(arrow_type)
    if isinstance(feature, Array2D):
        return _array2d(np.ascontiguousarray(values).astype(feature.dtype, copy=False), feature.dtype)
    if isinstance(feature, List) and feature.feature == Value("int32"):
        if feature.length == -1:
            return ragged_int32_array(list(values))
        return _fixed_list_array(np.ascontiguousarray(values).astype(np.int32, copy=False))
    if isinstance(feature, Value):
        return pa.array(np.asarray(values), type=arrow_type)
    raise TypeError(f"no numpy conversion for feature {feature!r}: give its column as an Arrow array")
