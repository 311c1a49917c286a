"""The shard writer: pieces of buffers to shard files in a background thread, while the next piece is computed.

Owns the shards directory (`shard_XXXXX.arrow`, then `shard_XXXXX.json` once the shard is complete:
a shard without its manifest is redone on resume), a pool of reusable host pieces (pinned when the
model is on CUDA, so device-to-host copies are asynchronous) and the thread that writes them. A
buffer arrives as pieces in order, each appended to its shard as one record batch; the shard is
fsynced, renamed and given its manifest after its last piece. The queue is bounded and the pool
holds three pieces (one being filled, one queued, one being written), so host memory stays at
three pieces whatever the buffer size. An error in the thread is raised in the caller at its next
call; `close()` waits for the last shard.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Features

from sae_cache.arrow_format import TOKEN_IDS, ArrowFileWriter, read_json, write_json_atomic

_STOP = object()


@dataclass
class Buffer:
    """Rows of buffer `index` (all of it, or one piece): host tensors (trimmed by n_rows), where the stream goes on."""

    index: int
    tensors: dict[str, torch.Tensor]
    n_rows: int
    first: bool = True  # the buffer's first piece: opens its shard
    last: bool = True  # the buffer's last piece: completes its shard
    next_batch: int = 0
    next_skip: int = 0

    def columns(self):
        """numpy views of the filled rows (no copy)."""
        return {name: t[: self.n_rows].numpy() for name, t in self.tensors.items()}


class ShardWriter:
    """Writes Buffers as shards, in order, on a background thread (or inline with background=False)."""

    def __init__(
        self,
        directory: Path,
        features: Features,
        *,
        background: bool = True,
        pool_size: int = 3,
        direct_io: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.features = features
        self.direct_io = direct_io  # write around the page cache (final shards, not ones about to be shuffled)
        self.background = background
        self._free: queue.Queue = queue.Queue()
        self._allocated = 0
        self._pool_size = pool_size
        self._todo: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._open: ArrowFileWriter | None = None  # the shard being written, between its first and last piece
        self._thread = threading.Thread(target=self._work, name="sae_cache-writer", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    # -- layout ---------------------------------------------------------------------------------

    def shard_path(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.arrow"

    def manifest_path(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.json"

    def complete_shards(self, n_buffers: int) -> int:
        """How many shards, from the first, are complete (have a manifest)."""
        done = 0
        while done < n_buffers and self.manifest_path(done).exists():
            done += 1
        return done

    def read_manifest(self, index: int) -> dict:
        return read_json(self.manifest_path(index))

    # -- buffers --------------------------------------------------------------------------------

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

    def submit(self, buffer: Buffer, manifest: dict) -> None:
        """Queue a filled piece of shard `buffer.index`; `manifest` goes with the shard after its last piece."""
        self._raise_if_failed()
        if self._thread is None:
            self._write(buffer, manifest)
            return
        while True:
            try:
                self._todo.put((buffer, manifest), timeout=0.5)
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
            buffer, manifest = item
            try:
                if self._error is None:
                    self._write(buffer, manifest)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                self._free.put(buffer.tensors)

    def _write(self, buffer: Buffer, manifest: dict) -> None:
        path = self.shard_path(buffer.index)
        partial = path.with_name(path.name + ".partial")
        try:
            if buffer.first:
                self._open = ArrowFileWriter(partial, self.features, direct_io=self.direct_io)
            assert self._open is not None, "a shard's pieces arrive in order, its first piece first"
            self._open.write(buffer.columns())
            shard_rows = self._open.rows
            if buffer.last:
                self._open.close()
                self._open = None
        except OSError as e:
            self._open = None
            if e.errno != errno.ENOSPC:
                raise
            partial.unlink(missing_ok=True)
            raise OSError(
                errno.ENOSPC,
                f"disk full while writing shard {buffer.index} in {self.directory}: the {buffer.index} shard(s) before it "
                "are kept. Free some space, then rerun with resume=True.",
            ) from e
        if buffer.last:
            partial.replace(path)
            rows = {"rows": shard_rows, "next_batch": buffer.next_batch, "next_skip": buffer.next_skip}
            write_json_atomic(self.manifest_path(buffer.index), {**rows, **manifest})
        if self._thread is None:
            self._free.put(buffer.tensors)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def allocate_host_buffer(
    hook_dims: dict[str, int],
    rows: int,
    length: int,
    dtype: torch.dtype,
    *,
    pin: bool,
    labels: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Host tensors for one buffer: (rows, length, d) per hook, (rows, length) int32 token ids, (rows,) per label."""
    tensors = {hook: torch.empty((rows, length, d), dtype=dtype, pin_memory=pin) for hook, d in hook_dims.items()}
    tensors[TOKEN_IDS] = torch.empty((rows, length), dtype=torch.int32, pin_memory=pin)
    tensors.update(
        {name: torch.empty(rows, dtype=getattr(torch, label_dtype)) for name, label_dtype in (labels or {}).items()}
    )
    return tensors
