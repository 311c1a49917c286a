"""A reader for training outside SAELens: batches of activations as torch tensors.

Owns `CachedActivations`: open a cache directory written by sae_cache (or any datasets directory in
the same format), and iterate batches of `batch_tokens` activations (with their token ids) for one
hook, in file order or in a seeded random order of rows, or read a range of rows. Every storage format
is decoded (sae_cache.storage_formats) to the dtype and device asked for; a plain format read in its own
dtype on the CPU comes zero-copy from the memory-mapped Arrow files. The files are mapped copy-on-write
(MAP_PRIVATE), so every tensor handed out is writable: writing to one changes this process's private copy
of those pages, never the file (a read-only mapping would make an in-place write crash the process). It
reads the layout through `sae_cache.arrow_format`, the module that writes it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sae_cache.arrow_format import INFO_FILE, STATE_FILE, stream_columns
from sae_cache.columns import TOKEN_IDS
from sae_cache.files import read_json
from sae_cache.metadata import METADATA_FILE
from sae_cache.storage_formats import StorageFormat, formats_of


class CachedActivations:
    """A cache on disk, read through memory maps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist.")
        if not (self.path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{self.path} is not a cache directory (no {STATE_FILE}).")
        self.files = [self.path / f["filename"] for f in read_json(self.path / STATE_FILE)["_data_files"]]
        meta_path = self.path / METADATA_FILE
        self.metadata = read_json(meta_path) if meta_path.is_file() else {}
        features = read_json(self.path / INFO_FILE).get("features", {}) if (self.path / INFO_FILE).is_file() else {}
        if features.get(TOKEN_IDS, {}).get("length", -1) == -1:
            raise ValueError(
                f"{self.path} holds rows of different lengths (a position-targeted cache, or no fixed-length "
                f"{TOKEN_IDS!r} column): open it with datasets.load_from_disk."
            )
        self._batches = [batch for f in self.files for batch in private_columns(f)]
        self.formats: dict[str, StorageFormat] = formats_of(features)
        """Each hook and its storage format."""
        self.hook_names = list(self.formats)
        self.n_rows = sum(len(b[TOKEN_IDS]) for b in self._batches)
        self._starts = np.cumsum([0] + [len(b[TOKEN_IDS]) for b in self._batches])

    @property
    def sliced_context_size(self) -> int:
        """Stored positions per row."""
        return self._batches[0][TOKEN_IDS].shape[1]

    def d_in(self, hook: str | None = None) -> int:
        _, (_, values, *_) = self._columns(hook)
        return self._batches[0][values].shape[-1]

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.sliced_context_size

    def __len__(self) -> int:
        return self.n_rows

    def batches(
        self,
        batch_tokens: int,
        *,
        hook: str | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (acts [tokens, d_in], token_ids [tokens]) batches of `batch_tokens` tokens, both on `device`.

        acts are decoded to `dtype` (default: a plain format's own dtype, float32 for a compact one) on `device`
        (default: the CPU). A plain format in its own dtype on the CPU, in file order, gives zero-copy views of
        the file's private (copy-on-write) memory map within a record batch, writable without changing the file;
        shuffle=True visits the rows in a random order from `seed` (rows are gathered, so those batches are
        copies).
        """
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens!r} must be a positive integer (tokens per batch).")
        fmt, columns = self._columns(hook)
        units = self._shuffled_units(columns, batch_tokens, seed) if shuffle else self._file_units(columns)
        return (_decode(fmt, arrays, dtype, device) for arrays in _rebatch(units, batch_tokens, drop_last))

    def rows(
        self,
        start: int,
        stop: int,
        *,
        hook: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..stop-1 in file order: (acts [rows, positions, d_in], token_ids [rows, positions]) decoded as
        in `batches`."""
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows {start}..{stop} are not within the cache's {self.n_rows} rows.")
        fmt, columns = self._columns(hook)
        first, last = np.minimum(np.searchsorted(self._starts, [start, stop], side="right") - 1, len(self._batches) - 1)
        parts = [
            [self._batches[b][c][max(start - self._starts[b], 0) : stop - self._starts[b]] for c in columns]
            for b in range(first, last + 1)
        ]
        return _decode(fmt, _concatenate(parts), dtype, device)

    def _columns(self, hook: str | None) -> tuple[StorageFormat, list[str]]:
        """The format of `hook` and the columns read for it: token ids, the stored values, and any scales."""
        hook = self._hook(hook)
        fmt = self.formats[hook]
        return fmt, [TOKEN_IDS, fmt.values_column(hook)] + [c for c in [fmt.scale_column(hook)] if c is not None]

    def _hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hook_names) != 1:
                raise ValueError(f"this cache holds hooks {self.hook_names}: name the one to read with hook=...")
            return self.hook_names[0]
        if hook not in self.hook_names:
            raise ValueError(f"hook {hook!r} is not in this cache; it holds {self.hook_names}.")
        return hook

    def _file_units(self, columns: list[str]) -> Iterator[list[np.ndarray]]:
        for batch in self._batches:
            yield [_items(batch[c]) for c in columns]

    def _shuffled_units(self, columns: list[str], batch_tokens: int, seed: int) -> Iterator[list[np.ndarray]]:
        order = np.random.default_rng(seed).permutation(self.n_rows)
        rows_per_step = max(1, batch_tokens // self.sliced_context_size)
        for i in range(0, len(order), rows_per_step):
            rows = order[i : i + rows_per_step]
            which = np.searchsorted(self._starts, rows, side="right") - 1
            yield [
                _items(np.stack([self._batches[w][c][r - self._starts[w]] for w, r in zip(which, rows)]))
                for c in columns
            ]


def _items(values: np.ndarray) -> np.ndarray:
    """A column's rows [rows, positions, ...] as positions [rows * positions, ...] (a view)."""
    return values.reshape(-1, *values.shape[2:])


def _rebatch(units: Iterator[list[np.ndarray]], size: int, drop_last: bool) -> Iterator[list[np.ndarray]]:
    """Cut a stream of aligned column arrays (token ids first) into batches of `size` positions."""
    held: list[list[np.ndarray]] = []
    held_n = 0
    for arrays in units:
        start, n = 0, len(arrays[0])
        while start < n:
            take = min(size - held_n, n - start)
            held.append([a[start : start + take] for a in arrays])
            held_n += take
            start += take
            if held_n == size:
                yield _concatenate(held)
                held, held_n = [], 0
    if held and not drop_last:
        yield _concatenate(held)


def _concatenate(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each column's parts joined (the part itself, no copy, when there is one)."""
    return parts[0] if len(parts) == 1 else [np.concatenate(column) for column in zip(*parts)]


def _decode(fmt: StorageFormat, arrays: list[np.ndarray], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts, token_ids) of a hook's column arrays (token ids, values, any scales), decoded by its format."""
    tokens, *stored = [torch.from_numpy(_writable(a)) for a in arrays]
    return fmt.decode(*stored, dtype=dtype, device=device), tokens.to(device)


def _writable(values: np.ndarray) -> np.ndarray:
    """Views of a private map are writable; a read-only array (a map that could not be private) is copied."""
    return values if values.flags.writeable else values.copy()


def private_columns(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Each record batch of an Arrow file as writable numpy views on a private (copy-on-write) memory map of it."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            return
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError:  # no room for a private map under strict overcommit: read-only, copied when handed out
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = np.frombuffer(mapped, np.uint8)
    for columns in stream_columns(pa.BufferReader(pa.py_buffer(mapped))):
        yield {name: _on_map(values, base) for name, values in columns.items()}


def _on_map(values: np.ndarray, base: np.ndarray) -> np.ndarray:
    """`values` (a read-only view pyarrow made of the map) as a view of the map itself, writable where it is;
    a copy pyarrow made (bit-packed bools) as it is."""
    offset = values.ctypes.data - base.ctypes.data
    if not values.flags.c_contiguous or not 0 <= offset <= len(base) - values.nbytes:
        return values
    return base[offset : offset + values.nbytes].view(values.dtype).reshape(values.shape)
