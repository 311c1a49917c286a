"""The publish swap over an existing cache is one atomic exchange (renameat2 RENAME_EXCHANGE) where the OS has it:
the output path holds a complete cache at every moment. Where the OS or filesystem refuses the exchange (ENOSYS,
EINVAL, ENOTSUP), the backup-and-rename path runs instead (tests/test_publish.py covers it step by step).

The kills at every step of both paths, with the next run, are in tests/test_fault_injection.py.
"""

from __future__ import annotations

import errno
import threading

import pytest

from sae_cache import publish
from sae_cache.metadata import METADATA_FILE
from sae_cache.publish import RunPaths, repair_interrupted_swap, swap_into_place


class Injected(RuntimeError):
    pass


def make_cache(path, marker):
    path.mkdir(parents=True)
    (path / "file").write_text(marker)
    (path / METADATA_FILE).write_text("{}")


def fail_at(step, seen):
    def fault(name):
        seen.append(name)
        if name == step:
            raise Injected(step)

    return fault


@pytest.mark.parametrize(("step", "expected"), [("exchange", "old"), ("cleanup", "new")])
def test_a_failure_at_each_step_leaves_a_complete_cache_and_no_backup(tmp_path, monkeypatch, step, expected):
    out, staging = tmp_path / "out", tmp_path / "work" / "staging"
    make_cache(out, "old")
    make_cache(staging, "new")
    seen: list[str] = []
    monkeypatch.setattr(publish, "fault_point", fail_at(step, seen))
    with pytest.raises(Injected):
        swap_into_place(staging, out)
    assert seen[-1] == step and "backup" not in seen  # the exchange path, not the backup-and-rename one
    assert (out / "file").read_text() == expected
    assert not RunPaths(out).backup.exists()
    if step == "cleanup":  # the old cache waits at the staging path, in the work directory the next run removes
        assert (staging / "file").read_text() == "old"
    assert repair_interrupted_swap(out) is None
    assert (out / "file").read_text() == expected


def test_the_output_path_always_holds_a_complete_cache(tmp_path):
    """A reader polling the output path during 200 swaps never finds it missing or incomplete."""
    out = tmp_path / "out"
    make_cache(out, "v0")
    missing, done = [], threading.Event()

    def poll():
        while not done.is_set():
            if not (out / METADATA_FILE).is_file():
                missing.append(1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(1, 201):
            staging = tmp_path / "work" / "staging"
            make_cache(staging, f"v{i}")
            swap_into_place(staging, out)
            assert not staging.exists() and not RunPaths(out).backup.exists()
    finally:
        done.set()
        poller.join()
    assert (out / "file").read_text() == "v200"
    assert missing == []


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EINVAL, errno.ENOTSUP])
def test_no_exchange_falls_back_to_backup_and_rename(tmp_path, monkeypatch, code):
    out, staging = tmp_path / "out", tmp_path / "work" / "staging"
    make_cache(out, "old")
    make_cache(staging, "new")
    seen: list[str] = []

    def exchange(a, b):
        raise OSError(code, "no exchange here (simulated)")

    monkeypatch.setattr(publish, "exchange", exchange)
    monkeypatch.setattr(publish, "fault_point", seen.append)
    swap_into_place(staging, out)
    assert seen == ["exchange", "backup", "install", "cleanup"]
    assert (out / "file").read_text() == "new" and not RunPaths(out).backup.exists() and not staging.exists()


def test_other_exchange_errors_are_raised_and_change_nothing(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / "work" / "staging"
    make_cache(out, "old")
    make_cache(staging, "new")

    def exchange(a, b):
        raise OSError(errno.EACCES, "Permission denied (simulated)")

    monkeypatch.setattr(publish, "exchange", exchange)
    with pytest.raises(PermissionError):
        swap_into_place(staging, out)
    assert (out / "file").read_text() == "old" and (staging / "file").read_text() == "new"


def test_exchange_swaps_two_directories(tmp_path):
    """The exchange runs here (Linux on ext4, tmpfs, xfs, btrfs): the tests above take its path."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_cache(a, "A")
    make_cache(b, "B")
    publish.exchange(a, b)
    assert (a / "file").read_text() == "B" and (b / "file").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        publish.exchange(a, tmp_path / "missing")
