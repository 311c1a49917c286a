"""Every derived size of a run, from one pure function.

Owns `CachePlan` and `make_plan`: rows, rows per buffer, buffers, tokens, bytes in memory and on
disk. Nothing here touches a model, a dataset or the disk, so the plan can be shown (and checked
against free disk space) before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from sae_cache.config import sliced_length
from sae_cache.storage_formats import storage_format

TOKEN_ID_BYTES = 4  # token_ids are stored as int32
PIECE_BYTES = 64 << 20  # host memory is filled and written in pieces of at most this (and at most a quarter buffer)
PIECES_PER_BUFFER = 4
OFFSET_BYTES = 4  # Array2D stores list<list<...>>: one int32 offset per row and per position (scales have none)
# The shuffle of rows is written in place (sae_cache.shuffle_in_place) for rows of at least this many bytes
# (context x d_model values: the usual case; smaller ones would make many small random writes)...
IN_PLACE_MIN_ROW_BYTES = 16 << 10
IN_PLACE_MAX_ROWS = 8 << 20  # ...while the position of every row (8 bytes a row) stays small


@dataclass(frozen=True)
class CachePlan:
    """The resolved sizes of one cache."""

    hook_dims: dict[str, int]
    context_size: int
    sliced_context_size: int
    n_rows: int
    rows_per_buffer: int
    rows_per_piece: int
    n_buffers: int
    itemsize: int
    bytes_per_row: int
    activation_bytes: int
    disk_bytes: int
    peak_disk_bytes: int
    shuffle_in_place: bool = False  # rows go straight to their shuffled place (no shards, no second write)

    @property
    def n_tokens(self) -> int:
        """Tokens stored: rows times the sliced context size."""
        return self.n_rows * self.sliced_context_size

    @property
    def tokens_per_buffer(self) -> int:
        return self.rows_per_buffer * self.sliced_context_size

    def rows_in_buffer(self, index: int) -> int:
        """Rows of buffer `index`; the last buffer is trimmed to the exact row count."""
        return min(self.rows_per_buffer, self.n_rows - index * self.rows_per_buffer)

    def pieces_of_buffer(self, index: int) -> list[int]:
        """Row counts of the pieces that buffer `index` is filled and written in (one record batch each)."""
        rows = self.rows_in_buffer(index)
        return [min(self.rows_per_piece, rows - start) for start in range(0, rows, self.rows_per_piece)]

    def with_rows(self, n_rows: int) -> CachePlan:
        """The same plan for a part of the rows (one rank's share): buffers of the same size."""
        return replace(self, n_rows=n_rows, n_buffers=math.ceil(n_rows / self.rows_per_buffer))

    def to_dict(self) -> dict:
        return {**asdict(self), "n_tokens": self.n_tokens, "tokens_per_buffer": self.tokens_per_buffer}

    def describe(self) -> str:
        """Human-readable summary shown before any work starts."""
        hooks = ", ".join(f"{h} (d={d})" for h, d in self.hook_dims.items())
        return "\n".join(
            [
                f"hooks:              {hooks}",
                f"rows x positions:   {self.n_rows:,} x {self.sliced_context_size} "
                f"(context {self.context_size}) = {self.n_tokens:,} tokens",
                f"buffers:            {self.n_buffers} of {self.rows_per_buffer:,} rows "
                f"({self.tokens_per_buffer:,} tokens, {_gb(self.rows_per_buffer * self.bytes_per_row)}), "
                f"written in pieces of {self.rows_per_piece:,} rows",
                f"activation bytes:   {_gb(self.activation_bytes)}",
                f"disk (final/peak):  {_gb(self.disk_bytes)} / {_gb(self.peak_disk_bytes)}"
                + (" (shuffle written in place)" if self.shuffle_in_place else ""),
            ]
        )


def make_plan(
    *,
    hook_dims: dict[str, int],
    context_size: int,
    seqpos_slice: tuple[int | None, ...],
    training_tokens: int,
    dtype: str,
    model_batch_size: int,
    buffer_size_gb: float,
    shuffle: bool,
    shuffle_across_sequences: bool = False,
    label_dtypes: dict[str, str] | None = None,
) -> CachePlan:
    """Resolve the sizes of a run from the config's fields and what the model and data told us."""
    sliced_context_size = sliced_length(context_size, seqpos_slice)
    if sliced_context_size == 0:
        raise ValueError(f"seqpos_slice={seqpos_slice!r} selects no position of context_size={context_size}.")
    n_rows = training_tokens // sliced_context_size
    if n_rows < 1:
        raise ValueError(
            f"training_tokens={training_tokens} is less than one row of {sliced_context_size} tokens: "
            "increase training_tokens."
        )
    act_bytes_per_row, bytes_per_row = row_bytes(hook_dims, sliced_context_size, dtype)
    rows_per_buffer = min(_rows_per_buffer(buffer_size_gb, model_batch_size, bytes_per_row), n_rows)
    disk_bytes = n_rows * bytes_per_row
    in_place = shuffle and not shuffle_across_sequences and _in_place(bytes_per_row, n_rows, label_dtypes or {})
    # A shuffle of shards keeps them and its scratch copy until the shuffled cache is complete; written in place,
    # the cache's own data files are the only copy.
    peak_disk_bytes = disk_bytes * (3 if shuffle and not in_place else 1)
    return CachePlan(
        hook_dims=dict(hook_dims),
        context_size=context_size,
        sliced_context_size=sliced_context_size,
        n_rows=n_rows,
        rows_per_buffer=rows_per_buffer,
        rows_per_piece=_rows_per_piece(rows_per_buffer, bytes_per_row),
        n_buffers=math.ceil(n_rows / rows_per_buffer),
        itemsize=storage_format(dtype).itemsize,
        bytes_per_row=bytes_per_row,
        activation_bytes=n_rows * act_bytes_per_row,
        disk_bytes=disk_bytes,
        peak_disk_bytes=peak_disk_bytes,
        shuffle_in_place=in_place,
    )


def _in_place(bytes_per_row: int, n_rows: int, label_dtypes: dict[str, str]) -> bool:
    """Whether a shuffle of rows is written in place: large rows, few enough of them, and every column's values
    stored as they are (bool labels are bit-packed in Arrow: a row's bools cannot be written alone)."""
    return (
        bytes_per_row >= IN_PLACE_MIN_ROW_BYTES and n_rows <= IN_PLACE_MAX_ROWS and "bool" not in label_dtypes.values()
    )


def row_bytes(hook_dims: dict[str, int], sliced_context_size: int, dtype: str) -> tuple[int, int]:
    """Bytes of one row's activations (values and any scales) in the storage format `dtype`, and of the whole row on
    disk: with the int32 token ids and the Array2D offsets."""
    fmt = storage_format(dtype)
    act_bytes = sum(sliced_context_size * fmt.bytes_per_position(d) for d in hook_dims.values())
    offsets = len(hook_dims) * (sliced_context_size + 1) * OFFSET_BYTES
    return act_bytes, act_bytes + sliced_context_size * TOKEN_ID_BYTES + offsets


def _rows_per_buffer(buffer_size_gb: float, model_batch_size: int, bytes_per_row: int) -> int:
    """Rows that fit in buffer_size_gb, a multiple of model_batch_size so buffers never split a batch."""
    rows = max(1, int(buffer_size_gb * 1e9) // bytes_per_row)
    if rows >= model_batch_size:
        rows -= rows % model_batch_size
    return rows


def _rows_per_piece(rows_per_buffer: int, bytes_per_row: int) -> int:
    """Rows of one piece: a quarter of a buffer, at most PIECE_BYTES, at least one row."""
    rows = min(math.ceil(rows_per_buffer / PIECES_PER_BUFFER), PIECE_BYTES // bytes_per_row)
    return max(1, rows)


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3f} GB"
