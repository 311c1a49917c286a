"""The shard writer (sae_cache.writer) driven directly with `publish.ShardFiles`: pieces of buffers in, one shard
file per buffer out (one record batch per piece), its manifest only once the shard is complete, no `.partial` left,
host memory bounded by a pool of three pieces, and every failure on the writer thread raised in the caller (disk
full: a clear message, the partial shard removed, the shards before it kept). Then the runner's use of it."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from sae_cache import CacheActivationsRunner, store
from sae_cache.arrow_format import cache_features, read_arrow_columns
from sae_cache.columns import TOKEN_IDS
from sae_cache.publish import ShardFiles
from sae_cache.store import Piece, allocate_piece
from sae_cache.writer import ShardWriter

HOOK = "blocks.1.hook_resid_post"
D, LENGTH, PIECE_ROWS = 4, 3, 3
LABELS = {"label": "int64"}
FEATURES = cache_features({HOOK: D}, LENGTH, "float32", LABELS)
BUFFERS = [[3, 3, 1], [2], [3, 3]]  # rows of each piece of each buffer


def new_tensors() -> dict[str, torch.Tensor]:
    return allocate_piece({HOOK: D}, PIECE_ROWS, LENGTH, "float32", pin=False, labels=LABELS)


def fill(tensors: dict[str, torch.Tensor], first_row: int, n_rows: int) -> dict[str, np.ndarray]:
    """Give rows first_row.. their own values (row r: activations r + i/100, token ids r * 10 + position,
    label r); returns a copy of what was filled."""
    rows = torch.arange(first_row, first_row + n_rows)
    tensors[HOOK][:n_rows] = rows.view(-1, 1, 1) + torch.arange(LENGTH * D).view(1, LENGTH, D) / 100
    tensors[TOKEN_IDS][:n_rows] = rows.view(-1, 1) * 10 + torch.arange(LENGTH)
    tensors["label"][:n_rows] = rows
    return {name: t[:n_rows].numpy().copy() for name, t in tensors.items()}


def pieces(buffers=BUFFERS, acquire=new_tensors):
    """(piece, the values it holds) for every piece of `buffers`, in order; acquire() gives the tensors to fill."""
    row = 0
    for index, sizes in enumerate(buffers):
        for k, n_rows in enumerate(sizes):
            tensors = acquire()
            values = fill(tensors, row, n_rows)
            row += n_rows
            piece = Piece(index, tensors, n_rows, first=k == 0, last=k == len(sizes) - 1)
            piece.next_batch, piece.next_skip = 100 + index, index  # where the stream goes on (for the manifest)
            yield piece, values


def manifest_of(index: int) -> dict:
    return {"stats": {HOOK: {"n_tokens": index}}}


def assert_shards_hold(files: ShardFiles, expected: list[dict[str, np.ndarray]], buffers=BUFFERS) -> None:
    """Each buffer's shard holds its pieces as record batches, in order; its manifest says where to go on."""
    batches = iter(expected)
    for index, sizes in enumerate(buffers):
        read = list(read_arrow_columns(files.shard(index)))
        assert [len(b[TOKEN_IDS]) for b in read] == sizes  # one record batch per piece
        for batch in read:
            values = next(batches)
            assert all(np.array_equal(batch[name], values[name]) for name in FEATURES), index
        rows = {"rows": sum(sizes), "next_batch": 100 + index, "next_skip": index}
        assert files.read_manifest(index) == rows | manifest_of(index)
        assert datasets.Dataset.from_file(str(files.shard(index))).features == FEATURES
    assert files.n_complete(len(buffers) + 1) == len(buffers)
    assert not list(files.directory.glob("*.partial")) and not list(files.directory.glob("*.tmp"))


@pytest.mark.parametrize("background", [True, False], ids=["writer-thread", "inline"])
def test_pieces_become_one_shard_file_per_buffer(tmp_path, background):
    files = ShardFiles(tmp_path)
    expected = []
    with ShardWriter(files, FEATURES, background=background) as writer:
        for piece, values in pieces():
            writer.submit(piece, manifest_of(piece.index))
            expected.append(values)
    assert_shards_hold(files, expected)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"shard_{i:05d}.{ext}" for i in range(len(BUFFERS)) for ext in ("arrow", "json")]


def test_the_manifest_appears_only_after_the_last_piece(tmp_path):
    files = ShardFiles(tmp_path)
    writer = ShardWriter(files, FEATURES, background=False)
    for piece, _ in pieces():
        writer.submit(piece, manifest_of(piece.index))
        index = piece.index
        assert files.shard(index).exists() == files.manifest(index).exists() == piece.last
        assert files.partial(index).exists() == (not piece.last)
        assert files.n_complete(len(BUFFERS)) == index + piece.last
    writer.close()


def test_the_pool_never_allocates_more_than_three_pieces(tmp_path):
    files = ShardFiles(tmp_path)
    buffers = [[3, 3, 3, 1]] * 5  # 20 pieces through a pool of three
    made, seen, expected = [], set(), []

    def make():
        made.append(1)
        return new_tensors()

    with ShardWriter(files, FEATURES) as writer:
        for piece, values in pieces(buffers, lambda: writer.acquire(make)):
            seen.add(id(piece.tensors))
            writer.submit(piece, manifest_of(piece.index))
            expected.append(values)
    assert len(made) == 3 and len(seen) == 3
    assert_shards_hold(files, expected, buffers)  # a piece's memory was refilled only once it was written


def test_an_error_on_the_writer_thread_reaches_the_caller(tmp_path):
    files = ShardFiles(tmp_path / "missing")  # the writer thread cannot create its first shard
    writer = ShardWriter(files, FEATURES)
    with pytest.raises(FileNotFoundError, match="shard_00000.arrow.partial"):
        for piece, _ in pieces(acquire=lambda: writer.acquire(new_tensors)):  # raised at a later call
            writer.submit(piece, manifest_of(piece.index))
        writer.close()
    with pytest.raises(FileNotFoundError):
        writer.close()  # and at every call after
    assert not any(t.name == "sae_cache-writer" and t.is_alive() for t in threading.enumerate())


def test_shards_queued_before_an_error_in_the_caller_still_land(tmp_path):
    files = ShardFiles(tmp_path)
    expected = []
    with pytest.raises(KeyboardInterrupt), ShardWriter(files, FEATURES) as writer:
        for piece, values in pieces():
            writer.submit(piece, manifest_of(piece.index))
            expected.append(values)
            if piece.index == 1 and piece.last:
                raise KeyboardInterrupt
    assert_shards_hold(files, expected, BUFFERS[:2])
    assert not files.shard(2).exists()


def test_disk_full_is_a_clear_resumable_error_and_removes_the_partial_shard(tmp_path, monkeypatch):
    """ENOSPC from the OS while shard 1 is written (direct_io: the writes go through os.write)."""
    files = ShardFiles(tmp_path)
    real_write = os.write

    def full_in_shard_1(fd, data):
        partial = files.partial(1)
        if partial.exists() and os.fstat(fd).st_ino == partial.stat().st_ino:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_in_shard_1)
    expected = []
    with pytest.raises(OSError) as error:
        with ShardWriter(files, FEATURES, direct_io=True) as writer:
            for piece, values in pieces():
                writer.submit(piece, manifest_of(piece.index))
                expected.append(values)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value) == (
        f"disk full while writing shard 1 in {tmp_path}: the 1 buffer(s) before it are kept. "
        "Free some space, then rerun with resume=True."
    )
    monkeypatch.undo()
    assert_shards_hold(files, expected[:3], BUFFERS[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.arrow", "shard_00000.json"]


# -- the runner's use of it ------------------------------------------------------------------------------


def test_each_shard_is_written_piece_by_piece_from_a_pool_of_three(model, text_dataset, make_cfg, monkeypatch):
    allocations = []
    real_new = store.ActivationsStore.new_piece

    def counted(self):
        tensors = real_new(self)
        allocations.append(len(tensors[HOOK]))
        return tensors

    monkeypatch.setattr(store.ActivationsStore, "new_piece", counted)
    cfg = make_cfg()  # 40 rows, 10 rows per buffer
    runner = CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model)
    ds = runner.run().with_format("torch")
    plan = runner.plan
    assert plan.rows_per_buffer == 10 and plan.rows_per_piece == 3
    assert allocations == [3, 3, 3]  # three pieces of host memory, reused for all 4 x 4 pieces
    files = sorted(Path(cfg.new_cached_activations_path).glob("*.arrow"))
    for f in files:
        with pa.memory_map(str(f)) as source:
            sizes = [b.num_rows for b in pa.ipc.open_stream(source)]
        assert sizes == [3, 3, 3, 1]  # one record batch per piece
    rows = ds[:]
    assert rows[HOOK].shape == (40, 16, 32)
    assert not torch.isnan(rows[HOOK]).any()
