"""A reader for training outside SAELens: batches of activations as torch tensors.

Owns `CachedActivations`: open a cache directory written by sae_cache (or any datasets directory in
the same format), and iterate batches of `batch_tokens` activations (with their token ids) for one
hook, zero-copy from the memory-mapped Arrow files in file order, or in a seeded random order of rows.
The files are mapped copy-on-write (MAP_PRIVATE), so every tensor handed out is writable: writing to one
changes this process's private copy of those pages, never the file (a read-only mapping would make an
in-place write crash the process). It reads the layout through `sae_cache.arrow_format`, the module that
writes it.
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
        self.hook_names = [name for name, feature in features.items() if feature.get("_type") == "Array2D"]
        self.n_rows = sum(len(b[TOKEN_IDS]) for b in self._batches)

    @property
    def sliced_context_size(self) -> int:
        """Stored positions per row."""
        return self._batches[0][TOKEN_IDS].shape[1]

    def d_in(self, hook: str | None = None) -> int:
        return self._batches[0][self._hook(hook)].shape[-1]

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
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (acts [tokens, d_in], token_ids [tokens]) batches of `batch_tokens` tokens.

        In file order a batch inside one record batch is a zero-copy view of the file's private (copy-on-write)
        memory map, writable without changing the file; shuffle=True visits the rows in a random order from
        `seed` (rows are gathered, so those batches are copies).
        """
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens!r} must be a positive integer (tokens per batch).")
        hook = self._hook(hook)
        units = self._shuffled_units(hook, batch_tokens, seed) if shuffle else self._file_units(hook)
        return _rebatch(units, batch_tokens, drop_last)

    def _hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hook_names) != 1:
                raise ValueError(f"this cache holds hooks {self.hook_names}: name the one to read with hook=...")
            return self.hook_names[0]
        if hook not in self.hook_names:
            raise ValueError(f"hook {hook!r} is not in this cache; it holds {self.hook_names}.")
        return hook

    def _file_units(self, hook: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in self._batches:
            acts = batch[hook]
            yield acts.reshape(-1, acts.shape[-1]), batch[TOKEN_IDS].reshape(-1)

    def _shuffled_units(self, hook: str, batch_tokens: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = np.cumsum([0] + [len(b[TOKEN_IDS]) for b in self._batches])
        order = np.random.default_rng(seed).permutation(self.n_rows)
        rows_per_step = max(1, batch_tokens // self.sliced_context_size)
        for i in range(0, len(order), rows_per_step):
            rows = order[i : i + rows_per_step]
            which = np.searchsorted(starts, rows, side="right") - 1
            acts = np.stack([self._batches[w][hook][r - starts[w]] for w, r in zip(which, rows)])
            tokens = np.stack([self._batches[w][TOKEN_IDS][r - starts[w]] for w, r in zip(which, rows)])
            yield acts.reshape(-1, acts.shape[-1]), tokens.reshape(-1)


def _rebatch(
    units: Iterator[tuple[np.ndarray, np.ndarray]], size: int, drop_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a stream of (acts, tokens) arrays into batches of `size` rows of acts."""
    held: list[tuple[np.ndarray, np.ndarray]] = []
    held_n = 0
    for acts, tokens in units:
        start = 0
        while start < len(acts):
            take = min(size - held_n, len(acts) - start)
            held.append((acts[start : start + take], tokens[start : start + take]))
            held_n += take
            start += take
            if held_n == size:
                yield _to_tensors(held)
                held, held_n = [], 0
    if held and not drop_last:
        yield _to_tensors(held)


def _to_tensors(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(parts) == 1:
        acts, tokens = parts[0]
    else:
        acts, tokens = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    # Views of a private map are writable; a read-only one (a map that could not be private) is copied.
    return torch.from_numpy(_writable(acts)), torch.from_numpy(_writable(tokens))


def _writable(values: np.ndarray) -> np.ndarray:
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
