"""The backup-and-rename swap: a failure at every step leaves the old or the new cache, never neither."""

from __future__ import annotations

import errno
import json

import pytest
from datasets import load_from_disk

from sae_cache import CacheActivationsRunner, publish
from sae_cache.metadata import METADATA_FILE
from sae_cache.publish import RunPaths, repair_interrupted_swap, swap_into_place


class Injected(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_exchange(monkeypatch):
    """These tests take the backup-and-rename path, as on a filesystem without RENAME_EXCHANGE (the exchange
    path: tests/test_swap_exchange.py)."""

    def exchange(a, b):
        raise OSError(errno.ENOSYS, "no exchange (simulated)")

    monkeypatch.setattr(publish, "exchange", exchange)


def make_dir(path, marker):
    path.mkdir(parents=True)
    (path / "file").write_text(marker)
    (path / METADATA_FILE).write_text("{}")


def fail_at(step):
    def fault(name):
        if name == step:
            raise Injected(step)

    return fault


@pytest.mark.parametrize("step", ["backup", "install", "cleanup"])
def test_failure_at_each_step_keeps_a_complete_cache(tmp_path, monkeypatch, step):
    out, staging = tmp_path / "out", tmp_path / "staging"
    make_dir(out, "old")
    make_dir(staging, "new")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    monkeypatch.setattr(publish, "fault_point", fail_at(step))
    with pytest.raises(Injected):
        swap_into_place(staging, out)
    expected = "new" if step == "cleanup" else "old"
    assert (out / "file").read_text() == expected
    monkeypatch.setattr(publish, "fault_point", lambda name: None)
    repair_interrupted_swap(out)
    assert (out / "file").read_text() == expected
    assert not RunPaths(out).backup.exists()
    assert sentinel.read_text() == "keep me"


def test_repair_restores_the_backup_when_killed_between_renames(tmp_path):
    out = tmp_path / "out"
    make_dir(RunPaths(out).backup, "old")  # killed after out -> backup, before staging -> out
    assert "restored" in repair_interrupted_swap(out)
    assert (out / "file").read_text() == "old"
    assert not RunPaths(out).backup.exists()


def test_repair_removes_a_backup_left_after_a_finished_swap(tmp_path):
    out = tmp_path / "out"
    make_dir(out, "new")
    make_dir(RunPaths(out).backup, "old")
    assert "removed" in repair_interrupted_swap(out)
    assert (out / "file").read_text() == "new"


def test_repair_refuses_to_guess_between_two_incomplete_copies(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "partial").write_text("x")
    make_dir(RunPaths(out).backup, "old")
    with pytest.raises(RuntimeError, match="inspect them"):
        repair_interrupted_swap(out)


def test_runner_overwrite_failing_mid_swap_keeps_the_old_cache(model, text_dataset, make_cfg, monkeypatch):
    first = CacheActivationsRunner(make_cfg(), override_dataset=text_dataset, model=model).run()
    out = make_cfg().new_cached_activations_path
    monkeypatch.setattr(publish, "fault_point", fail_at("install"))
    with pytest.raises(Injected):
        CacheActivationsRunner(
            make_cfg(training_tokens=16 * 12, overwrite=True), override_dataset=text_dataset, model=model
        ).run()
    assert len(load_from_disk(out)) == len(first) == 40
    assert json.loads((RunPaths(__import__("pathlib").Path(out)).out / METADATA_FILE).read_text())["n_rows"] == 40
