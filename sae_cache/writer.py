"""The writers of pieces: a background thread that writes each piece while the next one is computed.

Owns `PieceWriter`, what every way of writing a run's buffers shares: a pool of reusable host pieces (pinned
when the model is on CUDA, so device-to-host copies are asynchronous), the bounded queue and the thread that
writes them, in order, and the buffer's manifest once all of it is on disk (`publish.ShardFiles` names it; a
buffer without its manifest is redone on resume). Before writing a piece the thread calls `piece.finish()`:
it waits for the piece's copies and returns the running statistics the manifest records (and raises on float16
overflow, so a piece with infs is never written in error mode). The pool holds three pieces (one being filled,
one queued, one being written), so host memory stays at three pieces whatever the buffer size. An error in the
thread is raised in the caller at its next call; `close()` waits for the last piece.

Also owns `ShardWriter`: each buffer as its own shard file, one record batch per piece, fsynced, renamed from
`.partial` and given its manifest after its last piece. (The shuffle written in place is
sae_cache.shuffle_in_place.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import asdict

import torch
from datasets import Features

from sae_cache.arrow_format import ArrowFileWriter
from sae_cache.files import DiskFullError, disk_full, write_json_atomic
from sae_cache.publish import ShardFiles
from sae_cache.store import Piece

_STOP = object()


class PieceWriter:
    """Writes the pieces of buffers in order on a background thread (or inline with background=False).

    Subclasses write a piece in `_write(piece, manifest)` and call `_complete` after a buffer's last piece.
    """

    def __init__(self, files: ShardFiles, *, background: bool = True, pool_size: int = 3) -> None:
        self.files = files
        self._free: queue.Queue = queue.Queue()
        self._allocated = 0
        self._pool_size = pool_size
        self._todo: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="sae_cache-writer", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def acquire(self, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Host tensors to fill: new ones while the pool is short, else ones the writer has released."""
        self._raise_if_failed()
        if self._allocated < self._pool_size and self._free.empty():
            self._allocated += 1
            return make()
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise_if_failed()

    def submit(self, piece: Piece, manifest: dict | None = None) -> None:
        """Queue a filled piece of buffer `piece.index`; `manifest` (extra keys) goes with the buffer's manifest."""
        self._raise_if_failed()
        if self._thread is None:
            self._handle(piece, manifest or {})
            return
        while True:
            try:
                self._todo.put((piece, manifest or {}), timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait for every queued piece; raise the writer's error if it had one."""
        if self._thread is not None and self._thread.is_alive():
            self._todo.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._thread is not None and self._thread.is_alive():
            self._todo.put(_STOP)  # the buffers already queued are complete: let them land, then stop
            self._thread.join()

    # -- the thread -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._todo.get()
            if item is _STOP:
                return
            piece, manifest = item
            try:
                if self._error is None:
                    self._handle(piece, manifest)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                self._free.put(piece.tensors)

    def _handle(self, piece: Piece, manifest: dict) -> None:
        stats = piece.finish()  # the piece's copies have landed and it holds no forbidden inf
        self._write(piece, {"stats": {hook: asdict(st) for hook, st in stats.items()}, **manifest})
        if self._thread is None:
            self._free.put(piece.tensors)

    def _write(self, piece: Piece, manifest: dict) -> None:
        raise NotImplementedError

    def _complete(self, piece: Piece, rows: int, manifest: dict) -> None:
        """After a buffer's last piece is on disk (fsynced): its manifest, where the stream goes on after it."""
        resume = {"rows": rows, "next_batch": piece.next_batch, "next_skip": piece.next_skip}
        write_json_atomic(self.files.manifest(piece.index), {**resume, **manifest})

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class ShardWriter(PieceWriter):
    """Writes the pieces of buffers as shards, in order."""

    def __init__(self, files: ShardFiles, features: Features, *, direct_io: bool = False, **options) -> None:
        """options: PieceWriter's (background, pool_size)."""
        self.features = features
        self.direct_io = direct_io  # write around the page cache (final shards, not ones about to be shuffled)
        self._open: ArrowFileWriter | None = None  # the shard being written, between its first and last piece
        super().__init__(files, **options)

    def _write(self, piece: Piece, manifest: dict) -> None:
        partial = self.files.partial(piece.index)
        kept = f"the {piece.index} buffer(s) before it are kept"
        try:
            with disk_full(f"writing shard {piece.index} in {self.files.directory}", kept):
                if piece.first:
                    self._open = ArrowFileWriter(partial, self.features, direct_io=self.direct_io)
                assert self._open is not None, "a shard's pieces arrive in order, its first piece first"
                self._open.write(piece.columns())
                if piece.last:
                    rows = self._open.rows
                    self._open.close()
                    self._open = None
                    partial.replace(self.files.shard(piece.index))
                    self._complete(piece, rows, manifest)
        except OSError as e:
            self._open = None
            if isinstance(e, DiskFullError):
                partial.unlink(missing_ok=True)
            raise
