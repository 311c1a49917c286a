"""Bad input fails with one clear error before the first forward pass, leaving nothing that looks like a cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import data_passes, fail_at_pass
from datasets import Dataset

from sae_cache import CacheActivationsRunner
from sae_cache.publish import RunPaths


@pytest.fixture
def no_forward(model):
    """Fail the test if the model runs a forward pass over data (the shape probe is allowed)."""
    with data_passes(model, fail_at_pass(1, AssertionError("a forward pass ran before the error"))) as passes:
        yield
    assert passes == []


def assert_fails_cleanly(cfg, dataset, model, match, error=ValueError):
    out = Path(cfg.new_cached_activations_path)
    existed = out.exists()
    with pytest.raises(error, match=match):
        CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()
    assert out.exists() == existed
    assert not RunPaths(out).work.exists() or existed


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"hook_name": "blocks.1.hook_resid_mid_typo"}, "not found in the model"),
        ({"hook_name": "blocks.7.hook_resid_post"}, "not found in the model"),
        ({"d_in": 64}, "d_in=64"),
        ({"context_size": 65, "training_tokens": 6500}, "n_ctx=64"),
        ({"hook_name": "blocks.0.attn.hook_pattern", "d_in": -1}, "attention patterns"),
        ({"context_size": -1}, "set context_size"),
        ({"context_size": 1, "training_tokens": 100}, "no room for text"),
    ],
)
def test_model_and_config_mismatches(model, text_dataset, make_cfg, no_forward, overrides, match):
    assert_fails_cleanly(make_cfg(**overrides), text_dataset, model, match)


def test_pretokenized_rows_shorter_than_context(model, token_dataset, make_cfg, no_forward):
    assert_fails_cleanly(make_cfg(context_size=32), token_dataset, model, "fewer than context_size=32")


def test_missing_columns(model, make_cfg, no_forward):
    assert_fails_cleanly(make_cfg(), Dataset.from_dict({"body": ["x"]}), model, "needs one of")


def test_empty_dataset(model, make_cfg, no_forward):
    assert_fails_cleanly(make_cfg(), Dataset.from_dict({"text": []}), model, "empty")


def test_separator_missing_from_tokenizer(model, text_dataset, make_cfg, no_forward):
    from transformers import PreTrainedTokenizerFast

    no_sep = PreTrainedTokenizerFast(
        tokenizer_object=model.tokenizer.backend_tokenizer,
        name_or_path="no-sep",
        add_bos_token=True,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    assert no_sep.sep_token_id is None
    other = copy.deepcopy(model)
    other.tokenizer = no_sep
    assert_fails_cleanly(make_cfg(sequence_separator_token="sep"), text_dataset, other, "no sep token")


def test_not_enough_disk_space(model, text_dataset, make_cfg, no_forward, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert_fails_cleanly(make_cfg(), text_dataset, model, "not enough disk space", OSError)


def test_non_empty_output_directory_is_refused_and_kept(model, text_dataset, make_cfg, no_forward):
    cfg = make_cfg()
    out = Path(cfg.new_cached_activations_path)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_fails_cleanly(cfg, text_dataset, model, "already holds other files")
    assert (out / "notes.txt").read_text() == "mine"


def test_output_path_that_is_a_file(model, text_dataset, make_cfg, no_forward):
    cfg = make_cfg()
    Path(cfg.new_cached_activations_path).write_text("x")
    assert_fails_cleanly(cfg, text_dataset, model, "is a file")


def test_dataset_too_small_never_presents_a_cache(model, make_cfg):
    small = Dataset.from_dict({"text": ["a short text with few tokens"] * 3})
    cfg = make_cfg()
    with pytest.raises(ValueError, match="ran out"):
        CacheActivationsRunner(cfg, override_dataset=small, model=model).run()
    assert not Path(cfg.new_cached_activations_path).exists()


def test_interrupted_run_needs_resume_or_overwrite(model, text_dataset, make_cfg):
    cfg = make_cfg()
    with data_passes(model, fail_at_pass(3, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    with pytest.raises(ValueError, match="resume=True"):
        CacheActivationsRunner(make_cfg(), override_dataset=text_dataset, model=model).run()
    assert not Path(cfg.new_cached_activations_path).exists()


def test_resume_gives_the_same_cache_and_refuses_changed_config(model, text_dataset, make_cfg, tmp_path):
    reference = (
        CacheActivationsRunner(
            make_cfg(shuffle=True, new_cached_activations_path=str(tmp_path / "ref")),
            override_dataset=text_dataset,
            model=model,
        )
        .run()
        .with_format("torch")[:]
    )
    with data_passes(model, fail_at_pass(6, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        CacheActivationsRunner(make_cfg(shuffle=True), override_dataset=text_dataset, model=model).run()
    shards = sorted(RunPaths(Path(make_cfg().new_cached_activations_path)).shards.glob("*.json"))
    assert len(shards) == 2  # two complete buffers of two batches each survived
    with pytest.raises(ValueError, match="seed"):
        CacheActivationsRunner(
            make_cfg(shuffle=True, seed=1, resume=True), override_dataset=text_dataset, model=model
        ).run()
    resumed = CacheActivationsRunner(
        make_cfg(shuffle=True, resume=True), override_dataset=text_dataset, model=model
    ).run()
    resumed = resumed.with_format("torch")[:]
    assert torch.equal(resumed["token_ids"], reference["token_ids"])
    assert torch.equal(resumed["blocks.1.hook_resid_post"], reference["blocks.1.hook_resid_post"])


def test_resume_after_publish_only_cleans_up(model, text_dataset, make_cfg, monkeypatch):
    from sae_cache import runner as runner_module

    monkeypatch.setattr(runner_module, "remove_work", lambda paths: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        CacheActivationsRunner(make_cfg(), override_dataset=text_dataset, model=model).run()
    monkeypatch.undo()
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    assert paths.work.exists() and (paths.out / "sae_cache.json").exists()
    ds = CacheActivationsRunner(make_cfg(resume=True), override_dataset=text_dataset, model=no_model()).run()
    assert len(ds) == 40 and not paths.work.exists()


def no_model():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("the model was used although the cache was complete")

    return Untouchable()


def test_disk_full_mid_run_is_clear_and_resumable(model, text_dataset, make_cfg, monkeypatch):
    import errno

    from sae_cache import writer

    real = writer.ArrowFileWriter.write

    def full_in_third_shard(self, columns):
        if self.path.name.startswith("shard_00002") and self.rows:  # its second piece
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, columns)

    monkeypatch.setattr(writer.ArrowFileWriter, "write", full_in_third_shard)
    with pytest.raises(OSError, match="disk full while writing shard 2"):
        CacheActivationsRunner(make_cfg(), override_dataset=text_dataset, model=model).run()
    paths = RunPaths(Path(make_cfg().new_cached_activations_path))
    assert not paths.out.exists()
    assert sorted(p.name for p in paths.shards.iterdir() if p.suffix == ".json") == [
        "shard_00000.json",
        "shard_00001.json",
    ]
    monkeypatch.undo()
    ds = CacheActivationsRunner(make_cfg(resume=True), override_dataset=text_dataset, model=model).run()
    assert len(ds) == 40


def test_pretokenized_dataset_too_small_fails_before_work(model, token_dataset, make_cfg, no_forward):
    assert_fails_cleanly(
        make_cfg(context_size=24, training_tokens=24 * 201), token_dataset, model, "has 200 rows of 24 tokens"
    )


def test_text_dataset_too_small_warns_with_the_count(model, make_cfg):
    small = Dataset.from_dict({"text": ["a short text with few tokens"] * 3})
    with pytest.warns(RuntimeWarning, match="looks too small: about"), pytest.raises(ValueError, match="ran out"):
        CacheActivationsRunner(make_cfg(), override_dataset=small, model=model).run()
