"""Bad input found by trying, each one clear line before any pass over the data, leaving nothing behind.

From Python: one ValueError (a single line, naming the field) with no forward pass over data (a forward pre-hook on
the model fails the test if one runs) and nothing created at the output path. From the command line: exit code 2
and one line on stderr, no traceback, for the same inputs (one subprocess runs them all: tests/cli_driver.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_passes, no_pass
from datasets import Dataset

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache.publish import RunPaths

DRIVER = Path(__file__).with_name("cli_driver.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Datasets on disk: empty in every form, one with rows, and a data file given as a path."""
    root = tmp_path_factory.mktemp("data")
    paths = {name: root / name for name in ("saved-empty", "jsonl-empty", "parquet-empty", "texts")}
    Dataset.from_dict({"text": []}).save_to_disk(str(paths["saved-empty"]))
    paths["jsonl-empty"].mkdir()
    (paths["jsonl-empty"] / "train.jsonl").write_text("")
    paths["parquet-empty"].mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), paths["parquet-empty"] / "train.parquet")
    Dataset.from_dict({"text": ["the river is blue and the mountain is green."] * 200}).save_to_disk(
        str(paths["texts"])
    )
    paths["file"] = paths["jsonl-empty"] / "train.jsonl"
    paths["missing"] = root / "no-such-dataset"
    return paths


def fails_cleanly(cfg_fields: dict, model, dataset=None, match: str = "") -> str:
    """The run raises one single-line ValueError matching `match`, before any pass over data, leaving nothing."""
    out = Path(cfg_fields["new_cached_activations_path"])
    with data_passes(model, no_pass), pytest.raises(ValueError, match=match) as caught:
        cfg = CacheActivationsRunnerConfig(**cfg_fields)
        CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    assert not out.exists() and not RunPaths(out).work.exists()
    return message


def fields(tmp_path, **overrides) -> dict:
    return {
        "dataset_path": "unused-override-given",
        "model_name": "tiny",
        "model_batch_size": 5,
        "hook_name": "blocks.1.hook_resid_post",
        "training_tokens": 16 * 40,
        "context_size": 16,
        "new_cached_activations_path": str(tmp_path / "cache"),
        "shuffle": False,
        "device": "cpu",
        **overrides,
    }


@pytest.mark.parametrize("which", ["saved-empty", "jsonl-empty", "parquet-empty"])
@pytest.mark.parametrize("streaming", [True, False])
def test_an_empty_dataset_on_disk(model, tmp_path, data, which, streaming):
    message = fails_cleanly(fields(tmp_path, dataset_path=str(data[which]), streaming=streaming), model)
    assert message.startswith(f"dataset_path={str(data[which])!r}") and "rows" in message


def test_an_empty_dataset_object(model, tmp_path):
    fails_cleanly(fields(tmp_path), model, Dataset.from_dict({"text": []}), "override_dataset holds no rows")


@pytest.mark.parametrize(("which", "match"), [("missing", "does not exist"), ("file", "is a file")])
def test_a_dataset_path_that_is_not_a_dataset_directory(model, tmp_path, data, which, match):
    message = fails_cleanly(fields(tmp_path, dataset_path=str(data[which])), model, match=match)
    assert message.startswith(f"dataset_path={str(data[which])!r}")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"buffer_size_gb": float("inf")}, "buffer_size_gb=inf must be a finite number"),
        ({"buffer_size_gb": float("nan")}, "buffer_size_gb=nan must be a finite number"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"seed": -1, "shuffle": True}, "seed=-1 must be an integer >= 0"),
        ({"new_cached_activations_path": ""}, "new_cached_activations_path='' is empty"),
        ({"new_cached_activations_path": "."}, "is the working directory"),
    ],
)
def test_config_values(model, tmp_path, text_dataset, overrides, match):
    cfg_fields = fields(tmp_path, **overrides)
    with data_passes(model, no_pass), pytest.raises(ValueError, match=match):
        CacheActivationsRunner(CacheActivationsRunnerConfig(**cfg_fields), override_dataset=text_dataset, model=model)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sequence_separator_token": 100_000}, r"sequence_separator_token gives token id\(s\) \[100000\] outside"),
        ({"sequence_separator_token": 300}, r"\[300\] outside the tokenizer's vocabulary of 300 ids"),
        (
            {"exclude_special_tokens": [0, 299, 300], "shuffle": True, "shuffle_across_sequences": True},
            r"exclude_special_tokens gives token id\(s\) \[300\]",
        ),
    ],
)
def test_token_ids_outside_the_vocabulary(model, tmp_path, text_dataset, overrides, match):
    fails_cleanly(fields(tmp_path, **overrides), model, text_dataset, match)


def test_pretokenized_ids_outside_the_vocabulary(model, tmp_path, token_dataset):
    bad_first = token_dataset.map(lambda row, i: {"input_ids": [300] * 24} if i == 0 else row, with_indices=True)
    fails_cleanly(
        fields(tmp_path), model, bad_first, r"the pretokenized column 'input_ids' gives token id\(s\) \[300\]"
    )


def test_pretokenized_ids_outside_the_vocabulary_in_a_later_row_stop_the_run(model, tmp_path, token_dataset):
    """Found during the run (the rows are not read ahead): a ValueError, not an embedding's IndexError (or a
    CUDA device-side assert), and no cache."""
    bad_late = token_dataset.map(lambda row, i: {"input_ids": [-1] * 24} if i == 30 else row, with_indices=True)
    cfg = CacheActivationsRunnerConfig(**fields(tmp_path))
    with data_passes(model) as passes, pytest.raises(ValueError, match=r"token id\(s\) \[-1\] outside"):
        CacheActivationsRunner(cfg, override_dataset=bad_late, model=model).run()
    assert len(passes) == 6  # rows 0..29: the passes before the bad row's batch
    assert not Path(cfg.new_cached_activations_path).exists()


def test_an_unknown_model_name_is_one_short_line(tmp_path, text_dataset):
    cfg = CacheActivationsRunnerConfig(**fields(tmp_path, model_name="gpt2-no-such-model"))
    with pytest.raises(ValueError, match="model_name='gpt2-no-such-model' is not a model TransformerLens knows") as e:
        CacheActivationsRunner(cfg, override_dataset=text_dataset).run()
    assert len(str(e.value)) < 300


@pytest.fixture
def locked_dir(tmp_path):
    """A directory this process cannot create entries in: immutable (chattr +i) for root, else mode 0o555."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        locked.chmod(0o555)
    try:
        with pytest.raises(OSError) as denied:
            (locked / "probe").mkdir()
        yield locked, denied.value.strerror
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


@pytest.mark.parametrize("below", ["cache", "new/deeper/cache"])
def test_a_parent_that_cannot_be_written_is_named_with_the_real_cause(model, tmp_path, text_dataset, locked_dir, below):
    locked, cause = locked_dir
    out = locked / below
    message = fails_cleanly(fields(tmp_path, new_cached_activations_path=str(out)), model, text_dataset)
    assert message.startswith(f"new_cached_activations_path={str(out)!r} cannot be written: {locked}: {cause}")
    assert "disk space" not in message


def test_a_read_only_filesystem_is_named(model, tmp_path, text_dataset, monkeypatch):
    """Simulated at the system-call seam (no read-only mount without privileges): access() fails with EROFS."""
    import ctypes
    import errno

    class Libc:
        def access(self, path, mode):
            ctypes.set_errno(errno.EROFS)
            return -1

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name, use_errno=False: Libc())
    message = fails_cleanly(fields(tmp_path), model, text_dataset)
    assert f"cannot be written: {tmp_path}: Read-only file system" in message


def test_a_dataset_directory_that_cannot_be_read_is_named(model, tmp_path, data, monkeypatch):
    """Simulated at the system-call seam (root reads everything): access() fails with EACCES."""
    import ctypes
    import errno

    class Libc:
        def access(self, path, mode):
            ctypes.set_errno(errno.EACCES)
            return -1

    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.R_OK)
    monkeypatch.setattr(ctypes, "CDLL", lambda name, use_errno=False: Libc())
    message = fails_cleanly(fields(tmp_path, dataset_path=str(data["texts"])), model)
    assert message == f"dataset_path={str(data['texts'])!r} cannot be read: Permission denied."


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"seed": -1}, "seed=-1 must be an integer >= 0"), ({"output_path": "."}, "output_path='.' is the working")],
)
def test_targeted_caching_shares_the_checks(overrides, match):
    from sae_cache.targeted import TargetedCacheConfig

    with pytest.raises(ValueError, match=match):
        TargetedCacheConfig(**{"output_path": "out", "hook_names": "blocks.0.hook_resid_post", **overrides})


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root", "link"])
def test_protected_output_paths_are_refused_even_with_overwrite(model, tmp_path, text_dataset, monkeypatch, where):
    """Also when the config was changed after it was checked: run() checks the resolved path again."""
    cwd, home = tmp_path / "work" / "here", tmp_path / "home"
    cwd.mkdir(parents=True)
    home.mkdir()
    for d in (cwd, home, tmp_path / "work"):
        (d / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    target = {"cwd": cwd, "parent": cwd.parent, "home": home, "root": Path("/"), "link": tmp_path / "link"}[where]
    cfg = CacheActivationsRunnerConfig(**fields(tmp_path, overwrite=True))
    cfg.new_cached_activations_path = str(target)
    with data_passes(model, no_pass), pytest.raises(ValueError, match="must be a directory of its own"):
        CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    for d in (cwd, home, tmp_path / "work"):
        assert (d / "keep.txt").read_text() == "mine"
    if where != "link":
        with pytest.raises(ValueError, match="must be a directory of its own"):
            CacheActivationsRunnerConfig(**fields(tmp_path, overwrite=True, new_cached_activations_path=str(target)))


def cli_results(cases: list[list[str]], tmp_path: Path, env: dict | None = None) -> list[dict]:
    spec, results = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec), str(results)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


def test_the_command_line_gives_one_line_and_exit_2_for_each(tmp_path, data):
    """The same inputs through `python -m sae_cache` (the demo model, whose vocabulary has 4,096 ids)."""
    out = str(tmp_path / "out")
    base = ["--context_size", "16", "--training_tokens", "256", "--device", "cpu", "--shuffle", "false"]
    base += ["--new_cached_activations_path", out, "--dataset_path", str(data["texts"])]
    cases = {
        "saved-empty": ["--dataset_path", str(data["saved-empty"])],
        "jsonl-empty": ["--dataset_path", str(data["jsonl-empty"])],
        "parquet-empty": ["--dataset_path", str(data["parquet-empty"]), "--streaming", "true"],
        "file": ["--dataset_path", str(data["file"])],
        "missing": ["--dataset_path", str(data["missing"])],
        "hub-missing": ["--dataset_path", "no-such-user/no-such-dataset"],
        "inf": ["--buffer_size_gb", "inf"],
        "nan": ["--buffer_size_gb", "nan"],
        "separator": ["--sequence_separator_token", "5000"],
        "exclude": ["--exclude_special_tokens", "0,4096", "--shuffle", "true", "--shuffle_across_sequences", "true"],
        "seed": ["--seed", "-3"],
        "empty-out": ["--new_cached_activations_path", ""],
        "dot-out": ["--new_cached_activations_path", ".", "--overwrite", "true"],
        "root-out": ["--new_cached_activations_path", "/", "--overwrite", "true"],
        "model": ["--model_name", "gpt2-no-such-model"],
    }
    results = cli_results([[*base, *extra] for extra in cases.values()], tmp_path)
    expected = {
        "saved-empty": "dataset_path=",
        "jsonl-empty": "dataset_path=",
        "parquet-empty": "dataset_path=",
        "file": "is a file",
        "missing": "does not exist",
        "hub-missing": "dataset_path='no-such-user/no-such-dataset' is not a local directory",
        "inf": "buffer_size_gb=inf",
        "nan": "buffer_size_gb=nan",
        "separator": "sequence_separator_token gives token id(s) [5000] outside the tokenizer's vocabulary of 4,096",
        "exclude": "exclude_special_tokens gives token id(s) [4096]",
        "seed": "seed=-3",
        "empty-out": "new_cached_activations_path='' is empty",
        "dot-out": "new_cached_activations_path='.' is the working directory",
        "root-out": "new_cached_activations_path='/' is the filesystem root",
        "model": "model_name='gpt2-no-such-model' is not a model TransformerLens knows",
    }
    for name, result in zip(cases, results):
        lines = result["stderr"].strip().splitlines()
        why = f"{name}: {result}"
        assert result["raised"] is None and result["code"] == 2, why
        assert len(lines) == 1 and lines[0].startswith("sae_cache: error: ") and expected[name] in lines[0], why
        assert "Traceback" not in result["stderr"], why
    assert not Path(out).exists() and not RunPaths(Path(out)).work.exists()


def test_info_on_a_missing_directory_says_it_does_not_exist(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sae_cache", "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sae_cache: error: {tmp_path / 'nope'} does not exist: give the "
        "directory of a cache (its new_cached_activations_path)."
    ]
