"""The on-disk shuffle: rows (or positions) in a seeded uniform random order, on disk, in bounded memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_cache import CacheActivationsRunner, shuffle_io
from sae_cache import shuffle as shuffle_module
from sae_cache.arrow_format import ArrowFileWriter, cache_features, mapped_batches, read_arrow_columns
from sae_cache.shuffle import shuffle_shards
from sae_cache.shuffle_io import bytes_per_row as _bytes_per_row
from sae_cache.shuffle_io import item_keys

HOOK = "blocks.1.hook_resid_post"


def cache(cfg, dataset, model):
    ds = CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run().with_format("torch")[:]
    return ds[HOOK], ds["token_ids"]


def files_digest(path: str) -> str:
    digest = hashlib.sha256()
    for f in sorted(Path(path).glob("*.arrow")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def row_keys(acts: torch.Tensor, tokens: torch.Tensor) -> list[bytes]:
    return [a.numpy().tobytes() + t.numpy().tobytes() for a, t in zip(acts, tokens)]


def pair_keys(acts: torch.Tensor, tokens: torch.Tensor) -> list[bytes]:
    return sorted(row_keys(acts.reshape(-1, acts.shape[-1]), tokens.reshape(-1, 1)))


@pytest.fixture
def plain(model, text_dataset, make_cfg, tmp_path):
    return cache(make_cfg(new_cached_activations_path=str(tmp_path / "plain")), text_dataset, model)


def test_shuffled_rows_are_a_permutation_in_a_new_order(model, text_dataset, make_cfg, plain):
    cfg = make_cfg(shuffle=True)
    acts, tokens = cache(cfg, text_dataset, model)
    assert sorted(row_keys(acts, tokens)) == sorted(row_keys(*plain))
    assert row_keys(acts, tokens) != row_keys(*plain)
    # What the runner returned is what the files hold, in the same order.
    from datasets import load_from_disk

    disk = load_from_disk(cfg.new_cached_activations_path).with_format("torch")[:]
    assert torch.equal(disk[HOOK], acts) and torch.equal(disk["token_ids"], tokens)


def test_same_seed_same_bytes_other_seed_other_order(model, text_dataset, make_cfg, tmp_path):
    a = make_cfg(shuffle=True, seed=3, new_cached_activations_path=str(tmp_path / "a"))
    b = make_cfg(shuffle=True, seed=3, new_cached_activations_path=str(tmp_path / "b"))
    c = make_cfg(shuffle=True, seed=4, new_cached_activations_path=str(tmp_path / "c"))
    _, tokens_a = cache(a, text_dataset, model)
    _, tokens_b = cache(b, text_dataset, model)
    _, tokens_c = cache(c, text_dataset, model)
    assert files_digest(a.new_cached_activations_path) == files_digest(b.new_cached_activations_path)
    assert torch.equal(tokens_a, tokens_b)
    assert not torch.equal(tokens_a, tokens_c)


@pytest.mark.parametrize("across", [False, True])
def test_order_does_not_depend_on_buffer_size(model, text_dataset, make_cfg, tmp_path, across):
    small = make_cfg(shuffle=True, shuffle_across_sequences=across, new_cached_activations_path=str(tmp_path / "s"))
    big = make_cfg(
        shuffle=True,
        shuffle_across_sequences=across,
        buffer_size_gb=small.buffer_size_gb * 3,
        new_cached_activations_path=str(tmp_path / "b"),
    )
    acts_s, tokens_s = cache(small, text_dataset, model)
    acts_b, tokens_b = cache(big, text_dataset, model)
    assert torch.equal(tokens_s, tokens_b)
    assert torch.equal(acts_s, acts_b)


def test_across_sequences_keeps_each_activation_with_its_token(model, text_dataset, make_cfg, plain):
    acts, tokens = cache(make_cfg(shuffle=True, shuffle_across_sequences=True), text_dataset, model)
    assert pair_keys(acts, tokens) == pair_keys(*plain)
    # Rows now mix positions of many sequences: no stored row is an original row.
    original = set(row_keys(*plain))
    assert not any(k in original for k in row_keys(acts, tokens))


def test_exclude_special_tokens_drops_them_before_packing(model, text_dataset, make_cfg, tmp_path):
    bos = model.tokenizer.bos_token_id
    cfg = make_cfg(shuffle=True, shuffle_across_sequences=True, exclude_special_tokens=[bos])
    acts, tokens = cache(cfg, text_dataset, model)
    assert tokens.shape == (40, 16) and not (tokens == bos).any()
    # Ground truth: the first 640 non-BOS positions of the unshuffled stream.
    long = make_cfg(training_tokens=16 * 80, new_cached_activations_path=str(tmp_path / "long"))
    plain_acts, plain_tokens = cache(long, text_dataset, model)
    keep = plain_tokens.reshape(-1) != bos
    kept_acts = plain_acts.reshape(-1, 32)[keep][: 40 * 16]
    kept_tokens = plain_tokens.reshape(-1)[keep][: 40 * 16]
    assert pair_keys(acts, tokens) == pair_keys(kept_acts, kept_tokens)


def test_exclude_true_uses_the_tokenizer_special_tokens(model, text_dataset, make_cfg):
    _, tokens = cache(
        make_cfg(shuffle=True, shuffle_across_sequences=True, exclude_special_tokens=True), text_dataset, model
    )
    special = {
        model.tokenizer.bos_token_id,
        model.tokenizer.eos_token_id,
        model.tokenizer.pad_token_id,
        model.tokenizer.sep_token_id,
    }
    assert not set(tokens.unique().tolist()) & special


def test_item_keys_depend_only_on_the_item_index():
    whole = item_keys(7, 0, 200_000)
    parts = np.concatenate([item_keys(7, 0, 65_000), item_keys(7, 65_000, 131_072), item_keys(7, 131_072, 200_000)])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, item_keys(8, 0, 200_000))


def test_shuffle_order_is_uniform():
    """Position of item 0 after sorting 8 items by key, over many seeds: roughly uniform."""
    counts = np.zeros(8)
    for seed in range(4000):
        counts[np.argsort(item_keys(seed, 0, 8), kind="stable").tolist().index(0)] += 1
    expected = 4000 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # p = 0.001 for 7 degrees of freedom


def test_gather_holds_about_one_bucket(model, text_dataset, make_cfg, monkeypatch):
    """The shuffle never loads more than one bucket of items at once (memory bounded by the buffer): each bucket's
    files, removed by the gather once its rows are written, are smaller than a buffer, and every item went
    through them (its key and its values)."""
    buckets: dict[str, int] = {}
    real_remove = os.remove

    def remove(path, *args, **kwargs):
        name = Path(path).name
        if Path(path).parent.name == "buckets":
            bucket = name.split(".")[0]
            buckets[bucket] = buckets.get(bucket, 0) + os.path.getsize(path)
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", remove)
    cfg = make_cfg(shuffle=True, training_tokens=16 * 200, buffer_size_gb=make_cfg().buffer_size_gb * 2)
    CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    buffer_bytes = cfg.buffer_size_gb * 1e9
    assert len(buckets) > 4 and max(buckets.values()) < buffer_bytes  # a bucket is about a quarter of a buffer
    assert sum(buckets.values()) == 200 * (8 + 16 * 32 * 4 + 16 * 4)  # every row went through: key, values, ids


def synthetic_shards(
    directory: Path,
    rows_per_shard: list[int],
    length: int = 4,
    d: int = 3,
    batch_rows: int = 5,
    labels: dict | None = None,
):
    """Shards of one float32 hook whose values and token ids are the stream position (row * length + position),
    written in record batches of batch_rows rows (as the runner writes a buffer in pieces); label columns
    (name -> dtype) hold the row index."""
    features = cache_features({HOOK: d}, length, "float32", labels)
    files, row = [], 0
    for i, rows in enumerate(rows_per_shard):
        index = np.arange(row * length, (row + rows) * length).reshape(rows, length)
        columns = {HOOK: np.repeat(index[..., None], d, axis=2).astype(np.float32), "token_ids": index.astype(np.int32)}
        columns |= {name: (index[:, 0] // length).astype(dtype) for name, dtype in (labels or {}).items()}
        writer = ArrowFileWriter(directory / f"shard{i}.arrow", features)
        for start in range(0, rows, batch_rows):
            writer.write({k: v[start : start + batch_rows] for k, v in columns.items()})
        writer.close()
        files.append(directory / f"shard{i}.arrow")
        row += rows
    return features, files, row


def shuffle_synthetic(files, features, n_rows, out_dir, bucket_bytes, across=False):
    """`shuffle_shards` of synthetic shards into `out_dir`, seed 5, six rows a file."""
    return shuffle_shards(
        files,
        features=features,
        seed=5,
        across_sequences=across,
        rows_per_file=6,
        n_rows=n_rows,
        bucket_dir=out_dir.parent / "buckets",
        out_dir=out_dir,
        bucket_bytes=bucket_bytes,
    )


@pytest.mark.parametrize("mode", ["rows", "across sequences"])
@pytest.mark.parametrize("bucket_rows", [0.3, 2.5, 1000])
def test_order_is_the_stable_sort_of_the_item_keys(tmp_path, mode, bucket_rows, monkeypatch):
    """Buckets of unequal sizes (smaller than a row, a few rows, all), reused buffers, positions carried
    between buckets: the output is exactly the items sorted (stably) by their keys, cut into files."""
    across = mode == "across sequences"
    features, files, n_rows = synthetic_shards(tmp_path, [7, 1, 12], length=4)
    out = tmp_path / "out"
    out.mkdir()
    names = shuffle_synthetic(files, features, n_rows, out, int(bucket_rows * _bytes_per_row(features)), across)
    assert names == [f"data-{i:05d}-of-00004.arrow" for i in range(4)]
    tokens = np.concatenate([c["token_ids"] for name in names for c in read_arrow_columns(out / name)])
    acts = np.concatenate([c[HOOK] for name in names for c in read_arrow_columns(out / name)])
    n_items = n_rows * 4 if across else n_rows
    expected = np.argsort(item_keys(5, 0, n_items), kind="stable")
    got = tokens.reshape(-1) if across else tokens[:, 0] // 4
    assert np.array_equal(got, expected)
    assert np.array_equal(acts[..., 0], tokens) and np.array_equal(acts[..., 2], tokens)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is what is tested")
@pytest.mark.parametrize("mode", ["rows", "across sequences"])
def test_the_scatter_frees_the_page_cache_of_exactly_the_bytes_it_read(tmp_path, monkeypatch, mode):
    """Every column byte of every record batch is released once, nothing outside the columns (the
    framing, the Arrow offsets) and nothing twice; the shards are left as they were."""
    across = mode == "across sequences"
    features, files, n_rows = synthetic_shards(tmp_path, [7, 1, 12], length=4, batch_rows=3)
    before = {f: f.read_bytes() for f in files}
    dropped: dict[str, list[tuple[int, int]]] = {}
    real_fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED
        dropped.setdefault(os.readlink(f"/proc/self/fd/{fd}"), []).append((offset, length))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(shuffle_module, "SCATTER_CHUNK_BYTES", _bytes_per_row(features) * 2)  # several chunks per batch
    (tmp_path / "out").mkdir()
    shuffle_synthetic(files, features, n_rows, tmp_path / "out", _bytes_per_row(features) * 3, across)
    for f in files:
        expected = []
        for columns, base in mapped_batches(f):
            expected += [(v.ctypes.data - base, v.nbytes) for v in columns.values()]
            del columns
        got = dropped[str(f.resolve())]
        assert _covers(got, expected)  # disjoint (nothing twice), and exactly the columns' bytes
        assert f.read_bytes() == before[f]


def _covers(got: list[tuple[int, int]], expected: list[tuple[int, int]]) -> bool:
    """The ranges in `got` are disjoint and their union is exactly the union of `expected`."""

    def union(ranges):
        out = []
        for offset, length in sorted(ranges):
            if out and out[-1][1] == offset:
                out[-1][1] = offset + length
            else:
                out.append([offset, offset + length])
        return out

    ends = sorted(got)
    disjoint = all(a[0] + a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    return disjoint and union(got) == union(expected)


def test_an_error_while_writing_propagates_and_stops_the_writer_thread(tmp_path, monkeypatch):
    import threading

    features, files, n_rows = synthetic_shards(tmp_path, [8, 8])
    calls = []

    def failing_write(self, columns):
        calls.append(len(columns["token_ids"]))
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(shuffle_io.RowSink, "write", failing_write)
    before = threading.active_count()
    with pytest.raises(OSError, match="disk full"):
        shuffle_shards(
            files,
            features=features,
            seed=1,
            across_sequences=False,
            rows_per_file=4,
            n_rows=n_rows,
            bucket_dir=tmp_path / "buckets",
            out_dir=tmp_path,
            bucket_bytes=_bytes_per_row(features) * 2,
        )
    assert len(calls) == 2  # nothing was written after the failure
    assert threading.active_count() == before
