"""The shuffle of rows written in place: each row goes from its piece straight to its final, seeded place.

Owns the path a run of `shuffle=True` (rows mode, large rows: `plan.shuffle_in_place`) takes instead of
writing shards and shuffling them: every byte of the cache is written once.

1. `lay_out` (rank 0, before any forward pass): the cache's data files are created in staging with their
   whole Arrow layout, taken from pyarrow itself (`arrow_format.lay_out_file`): schema, record batch headers
   and list offsets written, the values left as a hole. File i has `plan.rows_in_buffer(i)` rows in record
   batches of `plan.rows_per_piece` rows, as an unshuffled shard has.
2. `row_places`: where each stream row is stored, the inverse of the shuffled order (sae_cache.shuffle_io:
   the rows sorted stably by their seeded keys, as the shuffle of shards orders them; 8 bytes a row). Stream
   rows are counted over the whole stream, so the order does not depend on the number of ranks either.
3. `PlacedWriter`, a PieceWriter: each row of a piece is written at its place with positioned writes
   (`direct_io.PositionedFiles`: around the page cache where allowed); after a buffer's last piece the files
   are fsynced, then the buffer's manifest is written (`publish.ShardFiles`' name; no shard file). A resumed
   run rewrites the rows of the buffers without a manifest: the same bytes at the same places. Every rank
   writes its own rows into the same files.

Written with all their rows, the files hold exactly the bytes ArrowFileWriter writes for the shuffled rows in
record batches of `plan.rows_per_piece` rows (tests/test_shuffle_in_place.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from datasets import Features

from sae_cache.arrow_format import FileLayout, data_file_name, lay_out_file
from sae_cache.direct_io import PositionedFiles
from sae_cache.distributed import Ranks, stream_rows
from sae_cache.files import disk_full, fsync_path, write_json_atomic
from sae_cache.plan import CachePlan
from sae_cache.publish import RunPaths, ShardFiles, reset_dir
from sae_cache.shuffle_io import row_order
from sae_cache.store import Piece
from sae_cache.writer import PieceWriter


def file_names(plan: CachePlan) -> list[str]:
    """The shuffled cache's data files, one per buffer of the whole run."""
    return [data_file_name(i, plan.n_buffers) for i in range(plan.n_buffers)]


def lay_out(staging: Path, features: Features, plan: CachePlan) -> list[str]:
    """Create the data files in staging with their layout and a hole for the values; returns their names."""
    names = file_names(plan)
    for i, name in enumerate(names):
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            lay_out_file(features, plan.pieces_of_buffer(i), fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_path(staging)
    return names


def lay_out_once(paths: RunPaths, features: Features, plan: CachePlan) -> None:
    """Lay out the staged cache's data files unless this run already has (its record, paths.layout, comes last)."""
    if not paths.layout.exists():
        reset_dir(paths.staging)
        write_json_atomic(paths.layout, {"files": lay_out(paths.staging, features, plan)})


def row_places(seed: int, n_rows: int) -> np.ndarray:
    """out[s]: the row of the shuffled cache that stream row s becomes (the inverse of the shuffled order)."""
    order = row_order(seed, n_rows)
    places = np.empty(n_rows, np.int64)
    places[order] = np.arange(n_rows, dtype=np.int64)
    return places


class PlacedWriter(PieceWriter):
    """Writes each row of this rank's pieces at its place in the laid-out data files of `staging`."""

    def __init__(
        self,
        files: ShardFiles,
        staging: Path,
        features: Features,
        plan: CachePlan,
        *,
        seed: int,
        batch_size: int,
        ranks: Ranks,
        direct_io: bool = True,
        **options,
    ) -> None:
        """options: PieceWriter's (background, pool_size)."""
        self.plan, self.features, self.batch_size, self.ranks = plan, features, batch_size, ranks
        self.places = row_places(seed, plan.n_rows)
        self.out = PositionedFiles([staging / name for name in file_names(plan)], direct=direct_io)
        self._layouts: dict[tuple[int, ...], FileLayout] = {}
        self._next_row = 0  # this rank's row that the next piece starts with
        super().__init__(files, **options)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.out.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            self.out.close()

    def _write(self, piece: Piece, manifest: dict) -> None:
        if piece.first:
            self._next_row = piece.index * self.plan.rows_per_buffer
        rows = np.arange(self._next_row, self._next_row + piece.n_rows)
        self._next_row += piece.n_rows
        places = self.places[stream_rows(rows, self.batch_size, self.ranks)]
        doing = f"writing the rows of buffer {piece.index} into {self.out.paths[0].parent}"
        with disk_full(doing, f"the {piece.index} buffer(s) before it are kept"):
            self._place(piece, places)
            if piece.last:
                self.out.sync()
        if piece.last:
            self._complete(piece, self._next_row - piece.index * self.plan.rows_per_buffer, manifest)

    def _place(self, piece: Piece, places: np.ndarray) -> None:
        """Write row k of the piece as row places[k] of the cache, in the order of the files."""
        values = piece.columns()
        by_file, rows = np.divmod(places, self.plan.rows_per_buffer)
        for f in np.unique(by_file).tolist():
            mine = np.flatnonzero(by_file == f)
            mine = mine[np.argsort(rows[mine])]
            layout = self._layout(f)
            offsets = layout.offsets(rows[mine]).tolist()
            columns = [values[name].reshape(piece.n_rows, -1).view(np.uint8) for name in layout.columns]
            for k, row_offsets in zip(mine.tolist(), offsets):
                for column, offset in zip(columns, row_offsets):
                    self.out.write(f, offset, column[k])

    def _layout(self, index: int) -> FileLayout:
        batch_rows = tuple(self.plan.pieces_of_buffer(index))
        if batch_rows not in self._layouts:
            self._layouts[batch_rows] = lay_out_file(self.features, list(batch_rows))
        return self._layouts[batch_rows]
