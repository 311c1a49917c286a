"""The shard writer: pieces of buffers to shard files in a background thread, while the next piece is computed.

Owns writing one rank's shards (`publish.ShardFiles` names them: the shard, written as `.partial`, then its
manifest once complete; a shard without its manifest is redone on resume), a pool of reusable host pieces
(pinned when the model is on CUDA, so device-to-host copies are asynchronous) and the thread that writes them. A
buffer arrives as pieces in order, each appended to its shard as one record batch; the shard is
fsynced, renamed and given its manifest after its last piece. The queue is bounded and the pool
holds three pieces (one being filled, one queued, one being written), so host memory stays at
three pieces whatever the buffer size. An error in the thread is raised in the caller at its next
call; `close()` waits for the last shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
from datasets import Features

from sae_cache.arrow_format import ArrowFileWriter
from sae_cache.files import DiskFullError, disk_full, write_json_atomic
from sae_cache.publish import ShardFiles
from sae_cache.store import Piece

_STOP = object()


class ShardWriter:
    """Writes the pieces of buffers as shards, in order, on a background thread (or inline with background=False)."""

    def __init__(
        self,
        files: ShardFiles,
        features: Features,
        *,
        background: bool = True,
        pool_size: int = 3,
        direct_io: bool = False,
    ) -> None:
        self.files = files
        self.features = features
        self.direct_io = direct_io  # write around the page cache (final shards, not ones about to be shuffled)
        self._free: queue.Queue = queue.Queue()
        self._allocated = 0
        self._pool_size = pool_size
        self._todo: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._open: ArrowFileWriter | None = None  # the shard being written, between its first and last piece
        self._thread = threading.Thread(target=self._work, name="sae_cache-writer", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    # -- pieces ---------------------------------------------------------------------------------

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

    def submit(self, piece: Piece, manifest: dict) -> None:
        """Queue a filled piece of shard `piece.index`; `manifest` goes with the shard after its last piece."""
        self._raise_if_failed()
        if self._thread is None:
            self._write(piece, manifest)
            return
        while True:
            try:
                self._todo.put((piece, manifest), timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait for every queued shard; raise the writer's error if it had one."""
        if self._thread is not None and self._thread.is_alive():
            self._todo.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._thread is not None and self._thread.is_alive():
            self._todo.put(_STOP)  # the shards already queued are complete: let them land, then stop
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
                    self._write(piece, manifest)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                self._free.put(piece.tensors)

    def _write(self, piece: Piece, manifest: dict) -> None:
        partial = self.files.partial(piece.index)
        kept = f"the {piece.index} shard(s) before it are kept"
        try:
            with disk_full(f"writing shard {piece.index} in {self.files.directory}", kept):
                if piece.first:
                    self._open = ArrowFileWriter(partial, self.features, direct_io=self.direct_io)
                assert self._open is not None, "a shard's pieces arrive in order, its first piece first"
                self._open.write(piece.columns())
                if piece.last:
                    rows = {"rows": self._open.rows, "next_batch": piece.next_batch, "next_skip": piece.next_skip}
                    self._open.close()
                    self._open = None
                    partial.replace(self.files.shard(piece.index))
                    write_json_atomic(self.files.manifest(piece.index), {**rows, **manifest})
        except OSError as e:
            self._open = None
            if isinstance(e, DiskFullError):
                partial.unlink(missing_ok=True)
            raise
        if self._thread is None:
            self._free.put(piece.tensors)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
