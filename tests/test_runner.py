"""End to end on CPU: every mode equals run_with_cache on the same tokens; the format contract; bad input."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from sae_cache import CacheActivationsRunner
from sae_cache.metadata import METADATA_FILE
from sae_cache.publish import RunPaths

HOOK = "blocks.1.hook_resid_post"


def run(cfg, dataset, model):
    return CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()


def expected_rows(model, texts, context_size, *, prepend_bos=True, separator="bos", disable_concat=False):
    """Token rows as SAELens builds them from raw text."""
    tok = model.tokenizer
    sep = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, None: None}.get(separator, separator)
    stream = (model.to_tokens(t, prepend_bos=False, truncate=False).squeeze(0) for t in texts)
    return torch.stack(
        list(
            concat_and_batch_sequences(
                stream,
                context_size,
                begin_batch_token_id=tok.bos_token_id if prepend_bos else None,
                sequence_separator_token_id=sep,
                disable_concat_sequences=disable_concat,
            )
        )
    )


def ground_truth(model, rows, hooks, batch_size, positions=slice(None)):
    """run_with_cache over rows in batches of batch_size: {hook: acts [rows, L, d]}."""
    out = {h: [] for h in hooks}
    for start in range(0, len(rows), batch_size):
        _, cache = model.run_with_cache(rows[start : start + batch_size], names_filter=hooks)
        for h in hooks:
            out[h].append(cache[h][:, positions])
    return {h: torch.cat(v) for h, v in out.items()}


def as_torch(ds):
    ds = ds.with_format("torch")
    return ds[:]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prepend_bos": False},
        {"sequence_separator_token": "eos"},
        {"sequence_separator_token": None},
        {"sequence_separator_token": 9},
        {"disable_concat_sequences": True},
        {"seqpos_slice": (2, 14, 3), "training_tokens": 4 * 40},
        {"hook_name": ["blocks.0.hook_mlp_out", HOOK, "blocks.2.attn.hook_z"], "d_in": -1},
    ],
    ids=["default", "no-bos", "eos-sep", "no-sep", "int-sep", "no-concat", "seqpos", "three-hooks"],
)
def test_unshuffled_cache_equals_run_with_cache(model, text_dataset, make_cfg, options):
    cfg = make_cfg(**options)
    ds = as_torch(run(cfg, text_dataset, model))
    rows = expected_rows(
        model,
        text_dataset["text"],
        cfg.context_size,
        prepend_bos=cfg.prepend_bos,
        separator=cfg.sequence_separator_token,
        disable_concat=cfg.disable_concat_sequences,
    )[:40]
    positions = slice(*cfg.seqpos_slice)
    assert torch.equal(ds["token_ids"].long(), rows[:, positions])
    truth = ground_truth(model, rows, cfg.hook_names, cfg.model_batch_size, positions)
    for hook in cfg.hook_names:
        expected = truth[hook].reshape(*truth[hook].shape[:2], -1)
        assert torch.equal(ds[hook], expected), hook


def test_pretokenized_rows_are_cut_and_context_inferred(model, token_dataset, make_cfg):
    cfg = make_cfg(context_size=-1, training_tokens=24 * 20)
    ds = as_torch(run(cfg, token_dataset, model))
    rows = torch.tensor(token_dataset["input_ids"][:20])
    assert ds[HOOK].shape == (20, 24, 32)
    assert torch.equal(ds["token_ids"].long(), rows)
    assert torch.equal(ds[HOOK], ground_truth(model, rows, [HOOK], 5)[HOOK])


def test_format_contract(model, text_dataset, make_cfg, tmp_path):
    cfg = make_cfg(training_tokens=16 * 37 + 5, dtype="float16", hook_name=[HOOK, "blocks.0.hook_resid_pre"], d_in=-1)
    out = tmp_path / "cache"
    runner = CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model)
    returned = runner.run()
    plan = runner.plan
    loaded = datasets.load_from_disk(str(out))
    assert isinstance(loaded, datasets.Dataset)
    assert len(loaded) == len(returned) == 37  # training_tokens // 16, the last buffer trimmed
    assert loaded.features[HOOK] == datasets.Array2D(shape=(16, 32), dtype="float16")
    assert loaded.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=16)
    assert loaded.column_names == [HOOK, "blocks.0.hook_resid_pre", "token_ids"]
    names = sorted(os.listdir(out))
    n = plan.n_buffers
    assert n == -(-37 // plan.rows_per_buffer) and n > 1
    assert names == [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)] + [
        "dataset_info.json",
        METADATA_FILE,
        "state.json",
    ]
    last = datasets.Dataset.from_file(str(out / f"data-{n - 1:05d}-of-{n:05d}.arrow"))
    assert len(last) == 37 - (n - 1) * plan.rows_per_buffer
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["n_rows"] == 37 and meta["sliced_context_size"] == 16 and meta["dtype"] == "float16"
    assert set(meta["hooks"]) == {HOOK, "blocks.0.hook_resid_pre"}
    assert meta["hooks"][HOOK]["stats"]["tokens_seen"] == 37 * 16
    assert meta["config"]["training_tokens"] == 16 * 37 + 5
    assert meta["versions"]["datasets"] == datasets.__version__
    arrow_bytes = sum(p.stat().st_size for p in out.glob("*.arrow"))
    raw = 37 * 16 * (32 * 2 * 2 + 4)  # activations and token ids
    assert plan.disk_bytes == raw + 37 * 2 * 17 * 4  # plus Array2D's int32 offsets
    assert plan.disk_bytes <= arrow_bytes <= plan.disk_bytes + n * 4096  # plus per-file schema and framing
    assert not RunPaths(out).work.exists() and not RunPaths(out).backup.exists()


@pytest.mark.parametrize("shuffle", [False, True])
def test_metadata_statistics_are_those_of_the_stored_activations(model, text_dataset, make_cfg, shuffle):
    """mean, std, mean_norm and max_abs of each hook, summed over buffers and pieces, equal numpy's over the whole
    cache (the store's own statistics are tested in test_store.py; here, what the metadata records)."""
    hooks = [HOOK, "blocks.0.hook_resid_pre"]
    cfg = make_cfg(hook_name=hooks, shuffle=shuffle, seqpos_slice=(1, None), training_tokens=15 * 37)
    ds = run(cfg, text_dataset, model).with_format("numpy")
    meta = json.loads((Path(cfg.new_cached_activations_path) / METADATA_FILE).read_text())
    for hook in hooks:
        acts = ds[hook][:].astype(np.float64)  # (rows, 15, 32)
        stats = meta["hooks"][hook]["stats"]
        assert stats["tokens_seen"] == acts.shape[0] * acts.shape[1] == 37 * 15
        assert stats["mean"] == pytest.approx(acts.mean(), rel=1e-5, abs=1e-6)
        assert stats["std"] == pytest.approx(acts.std(), rel=1e-5)
        assert stats["mean_norm"] == pytest.approx(np.linalg.norm(acts, axis=-1).mean(), rel=1e-5)
        assert stats["max_abs"] == pytest.approx(np.abs(acts).max(), rel=1e-6)
        assert stats["inf_after_cast"] == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtypes_are_stored_as_asked(model, text_dataset, make_cfg, dtype):
    ds = run(make_cfg(dtype=dtype, training_tokens=16 * 8), text_dataset, model)
    assert ds.features[HOOK].dtype == dtype
    truth = ground_truth(model, torch.tensor(ds["token_ids"]).long(), [HOOK], 5)[HOOK]
    assert np.allclose(np.asarray(ds.with_format("numpy")[:][HOOK]), truth.numpy(), atol=1e-6)


def test_unshuffled_consolidation_does_not_rewrite_bytes(model, text_dataset, make_cfg, monkeypatch):
    from sae_cache import publish

    linked = []
    real_link = os.link
    monkeypatch.setattr(publish.os, "link", lambda a, b: (linked.append((a, b)), real_link(a, b)))
    run(make_cfg(), text_dataset, model)
    assert len(linked) == 4  # every shard became a data file by a hard link


def test_float16_overflow_is_detected(tokenizer, text_dataset, make_cfg, model):
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.W_E.mul_(1e6)
    with pytest.raises(ValueError, match="float16 range"):
        run(make_cfg(dtype="float16", hook_name="blocks.0.hook_resid_pre"), text_dataset, loud)
    cfg = make_cfg(dtype="float16", hook_name="blocks.0.hook_resid_pre", fp16_overflow="warn", overwrite=True)
    with pytest.warns(RuntimeWarning, match="float16 range"):
        ds = run(cfg, text_dataset, loud)
    assert len(ds) == 40
    meta = json.loads((Path(cfg.new_cached_activations_path) / METADATA_FILE).read_text())
    assert meta["hooks"]["blocks.0.hook_resid_pre"]["stats"]["inf_after_cast"] > 0


def test_model_batch_size_does_not_change_the_rows(model, text_dataset, make_cfg, tmp_path):
    a = as_torch(run(make_cfg(model_batch_size=5), text_dataset, model))
    b = as_torch(
        run(make_cfg(model_batch_size=3, new_cached_activations_path=str(tmp_path / "b")), text_dataset, model)
    )
    assert torch.equal(a["token_ids"], b["token_ids"])
    torch.testing.assert_close(a[HOOK], b[HOOK], atol=1e-5, rtol=1e-5)


def test_overwrite_replaces_a_finished_cache(model, text_dataset, make_cfg):
    run(make_cfg(), text_dataset, model)
    with pytest.raises(ValueError, match="already holds a finished cache"):
        run(make_cfg(), text_dataset, model)
    ds = run(make_cfg(training_tokens=16 * 12, overwrite=True), text_dataset, model)
    assert len(ds) == 12


def test_returns_the_runner_plan_in_str(model, text_dataset, make_cfg):
    runner = CacheActivationsRunner(make_cfg(), override_dataset=text_dataset, model=model)
    text = str(runner)
    assert "40 x 16" in text and "4 of 10 rows" in text and HOOK in text
