"""Writes around the page cache (O_DIRECT): the bytes on disk are exactly the bytes given, whatever
the filesystem accepts; the runner uses them for final data files only. That an Arrow file written with
direct_io has the same bytes is tested in test_arrow_format.py."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import sae_cache.arrow_format as arrow_format
from sae_cache import CacheActivationsRunner
from sae_cache.arrow_format import ArrowFileWriter
from sae_cache.direct_io import ALIGN, DirectFile

SIZES = [0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 5, 10 * ALIGN + 3, 4, 2 * ALIGN]


def chunks(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES]


def write_all(path: Path, parts, **kwargs) -> DirectFile:
    f = DirectFile(path, **kwargs)
    for i, part in enumerate(parts):
        assert f.write(pa.py_buffer(part) if i % 2 else part) == len(part)  # pyarrow hands over bytes and Buffers
    assert f.tell() == sum(map(len, parts))
    f.close()
    return f


def o_direct_accepted(directory: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (directory / "probe").unlink(missing_ok=True)
    return True


@pytest.mark.parametrize("stage_bytes", [ALIGN, 3 * ALIGN, 1 << 20])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, stage_bytes):
    parts = chunks()
    f = write_all(tmp_path / "f", parts, stage_bytes=stage_bytes)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)  # no padding left at the end
    assert f.direct == o_direct_accepted(tmp_path)


def test_the_descriptor_really_bypasses_the_page_cache(tmp_path):
    if not o_direct_accepted(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: the fallback is tested below")
    f = DirectFile(tmp_path / "f")
    with open(f"/proc/self/fdinfo/{f._fd}") as info:
        flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
    f.close()
    assert flags & os.O_DIRECT


def test_without_o_direct_in_the_os_it_writes_through_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    parts = chunks(1)
    f = write_all(tmp_path / "f", parts)
    assert not f.direct and (tmp_path / "f").read_bytes() == b"".join(parts)


def test_a_filesystem_refusing_o_direct_at_open_gets_ordinary_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    parts = chunks(2)
    f = write_all(tmp_path / "f", parts)
    assert not f.direct and (tmp_path / "f").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("failure", ["EINVAL", "short write"])
@pytest.mark.parametrize("failing_call", [1, 2])  # the first direct write, or one after a direct write went through
def test_a_refused_or_short_direct_write_falls_back_without_losing_bytes(tmp_path, monkeypatch, failure, failing_call):
    if not o_direct_accepted(tmp_path):
        pytest.skip("needs a filesystem that accepts O_DIRECT at open")
    real_write, calls = os.write, []

    def flaky_write(fd, data):
        calls.append(len(data))
        if len(calls) == failing_call:
            if failure == "EINVAL":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, memoryview(data)[:ALIGN])  # a short (aligned) direct write: the rest must follow
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    parts = chunks(3)
    f = write_all(tmp_path / "f", parts, stage_bytes=2 * ALIGN)
    assert not f.direct
    # after a short write only the missing part is written again; after EINVAL the whole block
    assert calls[failing_call] == (ALIGN if failure == "short write" else 2 * ALIGN)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


def test_a_length_of_whole_blocks_needs_no_tail(tmp_path):
    parts = [bytes(range(256)) * 16 * 3, b"\x07" * ALIGN]  # 4 blocks: the stage fills exactly, nothing left at close
    f = write_all(tmp_path / "f", parts, stage_bytes=2 * ALIGN)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)
    assert f.direct == o_direct_accepted(tmp_path)


def test_a_closed_file_refuses_writes_and_closes_once(tmp_path):
    f = DirectFile(tmp_path / "f")
    f.write(b"abc")
    fd = f._fd
    f.close()
    f.close()  # a second close does nothing
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is closed
    with pytest.raises(ValueError, match="closed"):
        f.write(b"more")
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_other_write_errors_reach_the_caller(tmp_path, monkeypatch):
    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    f = DirectFile(tmp_path / "f", stage_bytes=ALIGN)
    fd = f._fd
    with pytest.raises(OSError) as e:
        f.write(bytes(3 * ALIGN))
        f.close()
    assert e.value.errno == errno.ENOSPC
    del e, f  # abandoned after the error: its descriptor is closed when it is collected
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.arrow")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_runner_writes_only_final_files_around_the_page_cache(
    model, text_dataset, make_cfg, tmp_path, monkeypatch, shuffle
):
    opened = []
    real_init = ArrowFileWriter.__init__

    def spy(self, path, features, *, direct_io=False):
        opened.append((Path(path).name, direct_io))
        real_init(self, path, features, direct_io=direct_io)

    monkeypatch.setattr(arrow_format.ArrowFileWriter, "__init__", spy)
    caches = {}
    for direct in (False, True):
        opened.clear()
        cfg = make_cfg(shuffle=shuffle, direct_io=direct, new_cached_activations_path=str(tmp_path / f"d{direct}"))
        CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
        caches[direct] = digest(cfg.new_cached_activations_path)
        shards = {d for name, d in opened if name.startswith("shard_")}
        outputs = {d for name, d in opened if name.startswith("data-")}
        # shards about to be shuffled are read back at once: through the page cache; final files: as asked
        assert shards == ({False} if shuffle else {direct})
        assert outputs == ({direct} if shuffle else set())  # unshuffled shards become the data files by rename
    assert caches[True] == caches[False]
