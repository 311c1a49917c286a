"""Writing a cache's final data files around the page cache (O_DIRECT), or through it where that is refused.

A cache's data files are written once and read later, by a training run, often from a cache larger
than RAM. Sent through the page cache, every byte costs a kernel copy into newly allocated pages
(the largest cost of writing on a CPU machine: half of the shuffle's samples in `perf`), and the
pages evict what the machine had cached. `DirectFile` is a write-only sink for pyarrow's IPC writer
that copies the bytes into a page-aligned staging buffer (reused for the whole file) and writes it with O_DIRECT in
aligned blocks; the last block is padded with zeros and the file truncated to its length, so the
bytes on disk are exactly the bytes written. `close()` fsyncs.

Where the OS has no O_DIRECT or the filesystem refuses it (tmpfs before Linux 6.6, some network
filesystems: EINVAL at open or at a write), the same object writes through the page cache; `direct` says which.
Files read back soon (shards that are about to be shuffled, the shuffle's buckets) do not use it.

`PositionedFiles` writes into existing files at given offsets (the shuffle written in place): the whole pages
of a write of at least DIRECT_MIN_BYTES around the page cache, from the same kind of staging buffer, and its
partial first and last pages through it, so that a page is only ever written one way even where neighbouring
writes (other rows, other processes) share it. Smaller writes go through the page cache: one thread's
synchronous direct writes of a few pages each wait on the disk's latency (on the development VM, 48 KiB rows
written at random places: 0.30 GB/s direct, 0.57 through the page cache; 1.5 MiB rows: about the same).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT offsets, lengths and addresses are multiples of the logical block size (512 or 4096)
STAGE_BYTES = 8 << 20
PAGE = max(ALIGN, mmap.PAGESIZE)  # PositionedFiles: the unit written around the page cache...
DIRECT_MIN_BYTES = 1 << 20  # ...in writes of at least this many whole pages
MAX_OPEN = 64  # PositionedFiles: files open at once


class DirectFile:
    """A write-only file at `path` (created or truncated) written with O_DIRECT where possible."""

    def __init__(self, path: Path, *, stage_bytes: int = STAGE_BYTES) -> None:
        if stage_bytes <= 0 or stage_bytes % ALIGN:
            raise ValueError(f"stage_bytes={stage_bytes} must be a positive multiple of {ALIGN}")
        self.path = Path(path)
        self._stage = self._staged = None
        self._fd, self.direct = _open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.closed = False  # from here on, __del__ closes the descriptor if close() is never reached
        if self.direct:
            self._stage = mmap.mmap(-1, stage_bytes)  # anonymous: page-aligned
            self._staged = np.frombuffer(self._stage, np.uint8)
        self._fill = 0  # bytes in the staging buffer
        self._size = 0  # bytes accepted so far: the file's length once closed

    # -- the file interface pyarrow uses ------------------------------------------------------------

    def write(self, data) -> int:
        """Accept `data` (any bytes-like object, e.g. a pyarrow Buffer); returns its length."""
        if self.closed:
            raise ValueError(f"write to a closed file: {self.path}")
        src = np.frombuffer(data, np.uint8)
        if self._staged is None:
            _write_all(self._fd, memoryview(src))
        else:
            done = 0
            while done < len(src):
                take = min(len(src) - done, len(self._staged) - self._fill)
                self._staged[self._fill : self._fill + take] = src[done : done + take]  # numpy copies without the GIL
                self._fill += take
                done += take
                if self._fill == len(self._staged):
                    self._write_stage(self._fill)
        self._size += len(src)
        return len(src)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Nothing to do: staged bytes are written in whole blocks, the rest at close()."""

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Write what is staged (padded to a block, then truncated to the exact length), fsync, close."""
        if self.closed:
            return
        try:
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._staged[self._fill : padded] = 0
                self._write_stage(padded)
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self._release()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self._release()  # abandoned after an error: close the descriptor, no fsync

    # -- internals ----------------------------------------------------------------------------------

    def _write_stage(self, nbytes: int) -> None:
        view = memoryview(self._stage)[:nbytes]
        try:
            written = os.write(self._fd, view) if self.direct else 0
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            written = 0
            self._fall_back()  # the filesystem accepted O_DIRECT at open but not these writes
        if written < nbytes:
            if self.direct:
                self._fall_back()  # a short direct write leaves the rest unaligned
            _write_all(self._fd, view[written:])
        self._fill = 0

    def _fall_back(self) -> None:
        import fcntl  # only reached where O_DIRECT exists (POSIX)

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        self.closed = True
        os.close(self._fd)
        self._staged = self._stage = None  # unmapped once no view of it is left (an error's traceback may hold one)


class PositionedFiles:
    """Existing files, written at given offsets; with direct=True whole pages go around the page cache.

    `sync()` fsyncs every file written since the last sync; at most MAX_OPEN files are open at once.
    """

    def __init__(self, paths: list[Path], *, direct: bool, stage_bytes: int = STAGE_BYTES) -> None:
        self.paths, self.direct = [Path(p) for p in paths], direct and bool(getattr(os, "O_DIRECT", 0))
        self._fds: OrderedDict[int, tuple[int, int | None]] = OrderedDict()  # file -> (buffered, direct or None)
        self._written: set[int] = set()
        self._stage = mmap.mmap(-1, stage_bytes) if self.direct else None  # anonymous: page-aligned

    def write(self, index: int, offset: int, data) -> None:
        """Write `data` (a contiguous 1-D uint8 array) into file `index` at `offset`."""
        buffered, direct = self._open(index)
        self._written.add(index)
        start, stop = -(-offset // PAGE) * PAGE, (offset + len(data)) // PAGE * PAGE
        if direct is None or stop - start < max(DIRECT_MIN_BYTES, PAGE):
            _pwrite_all(buffered, memoryview(data), offset)
            return
        _pwrite_all(buffered, memoryview(data[: start - offset]), offset)
        _pwrite_all(buffered, memoryview(data[stop - offset :]), stop)
        done = self._write_direct(direct, data[start - offset : stop - offset], start)
        _pwrite_all(buffered, memoryview(data[start - offset + done : stop - offset]), start + done)  # refused

    def sync(self) -> None:
        """fsync every file written since the last sync (reopening those closed since)."""
        for index in sorted(self._written):
            if index in self._fds:
                os.fsync(self._fds[index][0])
            else:
                fd = os.open(self.paths[index], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._written.clear()

    def close(self) -> None:
        while self._fds:
            self._close_one()
        self._stage = None

    def _open(self, index: int) -> tuple[int, int | None]:
        if index in self._fds:
            self._fds.move_to_end(index)
            return self._fds[index]
        if len(self._fds) >= MAX_OPEN:
            self._close_one()
        flags, direct = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), None
        if self.direct:
            fd, self.direct = _open(self.paths[index], flags)
            if self.direct:
                direct = fd
            else:
                os.close(fd)  # the filesystem refuses O_DIRECT: every file goes through the page cache
        self._fds[index] = (os.open(self.paths[index], flags), direct)
        return self._fds[index]

    def _close_one(self) -> None:
        _, (buffered, direct) = self._fds.popitem(last=False)
        os.close(buffered)
        if direct is not None:
            os.close(direct)

    def _write_direct(self, fd: int, data, offset: int) -> int:
        """Write whole pages through the staging buffer; returns how many bytes were written (fewer: refused)."""
        staged, done = np.frombuffer(self._stage, np.uint8), 0
        while done < len(data):
            n = min(len(staged), len(data) - done)
            staged[:n] = data[done : done + n]  # numpy copies without the GIL
            try:
                written = os.pwrite(fd, memoryview(self._stage)[:n], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                written = 0
            if written != n:
                self._refuse_direct()
                return done
            done += n
        return done

    def _refuse_direct(self) -> None:
        """The filesystem refused a direct write: from now on every write goes through the page cache."""
        self.direct = False
        for index, (buffered, direct) in self._fds.items():
            if direct is not None:
                os.close(direct)
            self._fds[index] = (buffered, None)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """A descriptor for writing `path` with `flags`, and O_DIRECT when the OS and the filesystem accept it."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view) :]
