"""Full disks and interrupted runs: every disk-full path says how to resume, resume's free-space check counts only
what is left to write, and a work directory without its run record is a run that never started.

A full disk is simulated at the system-call seam: `os.write` (what sae_cache's O_DIRECT writer calls for shards
and final data files), `os.sendfile` (shutil's copy) and `shutil.disk_usage`, each patched for this test only.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROW_BYTES, data_passes, fail_at_pass, no_pass

from sae_cache import CacheActivationsRunner, cli
from sae_cache.adapters import adapt
from sae_cache.direct_io import PositionedFiles
from sae_cache.publish import DISK_MARGIN, RunPaths

HOOK = "blocks.1.hook_resid_post"
WIDE_ROW_BYTES = 3 * 64 * 32 * 4 + 64 * 4 + 3 * 65 * 4  # three hooks, 64 positions: rows shuffled in place
WIDE = {
    "hook_name": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"],
    "context_size": 64,
    "training_tokens": 64 * 40,
    "buffer_size_gb": 10 * WIDE_ROW_BYTES * 1.001 / 1e9,  # ten rows a shard, as for the other modes
}


def fill_disk(monkeypatch, where: str) -> list[str]:
    """From now on, writes through os.write to a file whose path contains `where` find the disk full."""
    real, hits = os.write, []

    def write(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if where in path:
            hits.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return hits


def free_space(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def run(make_cfg, dataset, model, **fields):
    return CacheActivationsRunner(make_cfg(**fields), override_dataset=dataset, model=model).run()


def columns(dataset) -> dict[str, torch.Tensor]:
    return dataset.with_format("torch")[:]


def test_resume_needs_only_the_space_left_to_write(model, text_dataset, make_cfg, monkeypatch):
    hits = fill_disk(monkeypatch, "shard_00002")
    with pytest.raises(OSError, match=r"disk full while writing shard 2 .*rerun with resume=True"):
        run(make_cfg, text_dataset, model)
    assert hits
    monkeypatch.undo()
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    written = sum(paths.shard_files().shard(i).stat().st_size for i in range(2))
    runner = CacheActivationsRunner(make_cfg(resume=True), override_dataset=text_dataset, model=model)
    left = math.ceil((runner.plan.peak_disk_bytes - written) * DISK_MARGIN)
    assert left < runner.plan.peak_disk_bytes * DISK_MARGIN

    free_space(monkeypatch, int(left) - 1)  # one byte short: refused, and the two sizes read differently
    with data_passes(model, no_pass), pytest.raises(OSError, match="not enough disk space") as refused:
        runner.run()
    need, have = re.search(r"needs up to ([\d.]+) GB more.*, ([\d.]+) GB are free", str(refused.value)).groups()
    assert need != have and float(need) >= float(have), str(refused.value)
    assert "already written count as done" in str(refused.value)

    free_space(monkeypatch, int(left))  # exactly what is left to write: enough
    with data_passes(model) as passes:
        ds = CacheActivationsRunner(make_cfg(resume=True), override_dataset=text_dataset, model=model).run()
    assert len(ds) == 40 and len(passes) == 4  # two shards of two passes each were left
    assert not paths.work.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"shuffle": True},  # two passes through bucket files
        {"shuffle": True, "shuffle_across_sequences": True},
    ],
    ids=["buckets", "across"],
)
def test_a_disk_that_fills_during_the_shuffle_says_how_to_resume(
    model, text_dataset, make_cfg, monkeypatch, tmp_path, fields
):
    reference = columns(run(make_cfg, text_dataset, model, new_cached_activations_path=str(tmp_path / "ref"), **fields))
    hits = fill_disk(monkeypatch, "/staging/data-")
    with pytest.raises(OSError) as full:
        run(make_cfg, text_dataset, model, **fields)
    assert hits
    message = str(full.value)
    assert message.startswith("disk full while shuffling the cache") and "[Errno" not in message, message
    assert "4 complete shard(s) are kept" in message and message.endswith("rerun with resume=True.")
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    assert not paths.out.exists() and not paths.staging.exists()
    monkeypatch.undo()
    with data_passes(model) as passes:
        resumed = columns(run(make_cfg, text_dataset, model, resume=True, **fields))
    assert passes == []  # every shard was kept: the resume only shuffles
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_disk_that_fills_while_rows_are_written_in_place_says_how_to_resume(
    model, text_dataset, make_cfg, monkeypatch, tmp_path
):
    """Large rows are shuffled by writing each row at its place in the staged data files (positioned writes):
    a full disk there keeps the buffers already written, and the resume computes only the others."""
    fields = {"shuffle": True, **WIDE}
    reference = columns(run(make_cfg, text_dataset, model, new_cached_activations_path=str(tmp_path / "ref"), **fields))
    real, calls = PositionedFiles.write, [0]

    def write(self, index, offset, data):
        calls[0] += 1
        if calls[0] > 25 * 4:  # a row is four values (three hooks and the token ids): past the first buffers
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, index, offset, data)

    monkeypatch.setattr(PositionedFiles, "write", write)
    with pytest.raises(OSError) as full:
        run(make_cfg, text_dataset, model, **fields)
    message = str(full.value)
    assert message.startswith("disk full while writing the rows of buffer ") and "[Errno" not in message, message
    kept = int(re.search(r"the (\d+) buffer\(s\) before it are kept", message).group(1))
    assert 0 < kept < 4 and message.endswith("rerun with resume=True.")
    monkeypatch.undo()
    with data_passes(model) as passes:
        resumed = columns(run(make_cfg, text_dataset, model, resume=True, **fields))
    assert len(passes) == 2 * (4 - kept)  # two passes a buffer, only the buffers not kept
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_disk_that_fills_while_publishing_says_how_to_resume(model, text_dataset, make_cfg, monkeypatch):
    """No hard links (the shards are copied into the cache) and no space for the copies."""

    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported (simulated)")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "sendfile", no_space)
    with pytest.raises(OSError, match=r"^disk full while publishing the cache .*rerun with resume=True\.$"):
        run(make_cfg, text_dataset, model)
    monkeypatch.undo()
    with data_passes(model) as passes:
        assert len(run(make_cfg, text_dataset, model, resume=True)) == 40
    assert passes == []


@pytest.mark.parametrize("leftover", ["nothing", "torn record"])
def test_a_work_directory_without_its_run_record_is_a_run_that_never_started(model, text_dataset, make_cfg, leftover):
    """Killed between creating the work directory and writing run.json: resume starts the run afresh."""
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    paths.shards.mkdir(parents=True)
    if leftover == "torn record":
        paths.run_file.with_name(paths.run_file.name + ".tmp").write_text('{"fields": {"hook_na')
    assert len(run(make_cfg, text_dataset, model, resume=True)) == 40
    assert not paths.work.exists()


def test_shards_without_a_run_record_are_not_guessed_at(model, text_dataset, make_cfg):
    with data_passes(model, fail_at_pass(5, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        run(make_cfg, text_dataset, model)
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    paths.run_file.unlink()
    with data_passes(model, no_pass), pytest.raises(ValueError, match="run record run.json is missing"):
        run(make_cfg, text_dataset, model, resume=True)
    assert len(run(make_cfg, text_dataset, model, overwrite=True)) == 40


def test_the_summary_of_a_resumed_run_counts_only_the_tokens_computed_in_it(
    model, text_dataset, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    text_dataset.save_to_disk(str(data))
    monkeypatch.setattr("sae_cache.resolve.load_model", lambda name, **kwargs: adapt(model))
    argv = ["--dataset_path", str(data), "--model_name", "tiny", "--hook_name", HOOK, "--context_size", "16"]
    argv += ["--training_tokens", "640", "--model_batch_size", "5", "--device", "cpu", "--shuffle", "false"]
    argv += [
        "--buffer_size_gb",
        str(10 * ROW_BYTES * 1.001 / 1e9),
        "--new_cached_activations_path",
        str(tmp_path / "c"),
    ]
    with data_passes(model, fail_at_pass(6, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--quiet"])
    capsys.readouterr()
    assert cli.main([*argv, "--quiet", "--resume", "true"]) == 0
    printed = capsys.readouterr().out
    # 40 rows in 4 shards of 10; the interrupt in pass 6 kept 2 shards (20 rows of 16 tokens)
    assert "320 tokens computed in this run (320 were cached before it was interrupted)" in printed, printed
    assert cli.main([*argv[:-1], str(tmp_path / "d"), "--quiet"]) == 0
    assert "640 tokens computed in this run\n" in capsys.readouterr().out
