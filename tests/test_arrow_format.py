"""The Arrow/datasets file format (sae_cache.arrow_format): what we write, `datasets.load_from_disk` opens with the
same features and values, for every column kind of a cache and of a targeted cache; reading back is zero-copy
from the memory map, and the file offsets point at exactly a column's bytes; direct_io changes no byte."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets import Array2D, ClassLabel, Dataset, Features, Sequence, Value

from sae_cache.arrow_format import (
    INFO_FILE,
    STATE_FILE,
    ArrowFileWriter,
    cache_features,
    data_file_name,
    feature_row_layout,
    file_offset,
    fingerprint_of,
    mapped_batches,
    mixed_record_batch,
    ragged_int32_array,
    read_arrow_columns,
    record_batch,
    stream_columns,
    targeted_features,
    write_dataset_files,
)
from sae_cache.columns import TOKEN_IDS

HOOKS = {"blocks.0.hook_resid_post": 8, "blocks.1.attn.hook_z": 6}
LENGTH = 5
LABELS = {"doc": "int64", "score": "float64", "flag": "bool"}


def columns_of(n: int, dtype: str, seed: int, labels=LABELS) -> dict[str, np.ndarray]:
    """n rows of every column of a cache of HOOKS in `dtype`, with the label columns."""
    rng = np.random.default_rng(seed)
    columns = {hook: rng.standard_normal((n, LENGTH, d)).astype(dtype) for hook, d in HOOKS.items()}
    columns[TOKEN_IDS] = rng.integers(0, 50_000, (n, LENGTH), dtype=np.int32)
    values = {"int64": rng.integers(-(2**40), 2**40, n), "float64": rng.standard_normal(n), "bool": rng.random(n) < 0.5}
    columns.update({name: values[kind].astype(kind) for name, kind in (labels or {}).items()})
    return columns


def write_cache(directory, features, files: list[list[dict]]) -> list[str]:
    """Data files of record batches (one list of batches per file), then datasets' files; returns the file names."""
    names = [data_file_name(i, len(files)) for i in range(len(files))]
    for name, batches in zip(names, files, strict=True):
        writer = ArrowFileWriter(directory / name, features)
        for batch in batches:
            writer.write(batch)
        writer.close()
        assert writer.rows == sum(len(b[TOKEN_IDS]) for b in batches)
    write_dataset_files(directory, features, names, fingerprint_of({"files": names}))
    return names


def concat(batches: list[dict], name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in batches])


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_a_cache_round_trips_through_load_from_disk(tmp_path, dtype):
    features = cache_features(HOOKS, LENGTH, dtype, LABELS)
    files = [[columns_of(3, dtype, 0), columns_of(1, dtype, 1)], [columns_of(7, dtype, 2)], [columns_of(0, dtype, 3)]]
    write_cache(tmp_path, features, files)
    loaded = datasets.load_from_disk(str(tmp_path))
    assert loaded.features == features and loaded.column_names == [*HOOKS, TOKEN_IDS, *LABELS]
    assert loaded.features["blocks.1.attn.hook_z"] == Array2D(shape=(LENGTH, 6), dtype=dtype)
    assert loaded.features[TOKEN_IDS] == Sequence(Value("int32"), length=LENGTH)
    assert [loaded.features[name].dtype for name in LABELS] == list(LABELS.values())
    batches = [b for f in files for b in f]
    values = loaded[:]  # Python values: exact for every dtype (datasets' numpy format would cast floats to float32)
    assert len(loaded) == 11
    for name in features:
        expected = concat(batches, name)
        assert np.array_equal(np.asarray(values[name], dtype=expected.dtype), expected), name


def test_write_dataset_files_writes_what_datasets_reads(tmp_path):
    features = cache_features({"h": 2}, 3, "float32")
    ones = {"h": np.ones((2, 3, 2), np.float32), TOKEN_IDS: np.zeros((2, 3), np.int32)}
    names = write_cache(tmp_path, features, [[ones]])
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["_data_files"] == [{"filename": "data-00000-of-00001.arrow"}] and names == [
        "data-00000-of-00001.arrow"
    ]
    assert state["_fingerprint"] == fingerprint_of({"files": names}) and len(state["_fingerprint"]) == 16
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert Features.from_dict(info["features"]) == features
    assert datasets.load_from_disk(str(tmp_path))[:]["h"] == np.ones((2, 3, 2)).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INFO_FILE, *names, STATE_FILE])  # no temporary left


def test_names_fingerprints_and_row_layouts():
    assert data_file_name(3, 12) == "data-00003-of-00012.arrow"
    assert fingerprint_of({"a": 1, "b": [2]}) == fingerprint_of({"b": [2], "a": 1}) != fingerprint_of({"a": 2})
    assert all(c in "0123456789abcdef" for c in fingerprint_of({}))
    features = cache_features({"h": 8}, LENGTH, "float16", {"flag": "bool"})
    assert feature_row_layout(features["h"]) == ((LENGTH, 8), np.dtype("float16"))
    assert feature_row_layout(features[TOKEN_IDS]) == ((LENGTH,), np.dtype("int32"))
    assert feature_row_layout(features["flag"]) == ((), np.dtype("bool"))


def test_record_batches_are_built_from_the_arrays_memory():
    features = cache_features(HOOKS, LENGTH, "float32", LABELS)
    columns = columns_of(4, "float32", 0)
    batch = record_batch(features, columns)
    for hook in HOOKS:
        values = batch.column(hook).storage.flatten().flatten()
        assert values.buffers()[1].address == columns[hook].ctypes.data  # no copy of the activations
    assert batch.column(TOKEN_IDS).flatten().buffers()[1].address == columns[TOKEN_IDS].ctypes.data


def test_reading_back_is_zero_copy_from_the_memory_map(tmp_path):
    features = cache_features(HOOKS, LENGTH, "float16", LABELS)
    batches = [columns_of(3, "float16", 0), columns_of(6, "float16", 1)]
    write_cache(tmp_path, features, [batches])
    path = tmp_path / data_file_name(0, 1)

    source = pa.memory_map(str(path), "r")
    mapped = np.frombuffer(source.read_buffer(source.size()), np.uint8)  # the whole memory map, not a copy
    source.seek(0)
    read = list(stream_columns(source))
    for got, expected in zip(read, batches, strict=True):
        for name in [*HOOKS, TOKEN_IDS, "doc", "score"]:
            assert np.array_equal(got[name], expected[name]), name
            assert np.shares_memory(got[name], mapped), name  # a view of the map
        assert np.array_equal(got["flag"], expected["flag"]) and not np.shares_memory(got["flag"], mapped)  # bits

    for got in read_arrow_columns(path):
        assert not got[TOKEN_IDS].flags.writeable and not got[TOKEN_IDS].flags.owndata
        assert got["blocks.0.hook_resid_post"].shape[1:] == (LENGTH, 8) and got[TOKEN_IDS].shape[1:] == (LENGTH,)
        assert not any(v.flags.writeable for name, v in got.items() if name != "flag")


def test_file_offsets_point_at_exactly_the_column_bytes(tmp_path):
    features = cache_features(HOOKS, LENGTH, "float32", LABELS)
    write_cache(tmp_path, features, [[columns_of(3, "float32", 0), columns_of(5, "float32", 1)]])
    path = tmp_path / data_file_name(0, 1)
    data, size = path.read_bytes(), path.stat().st_size
    spans = []
    for columns, base in mapped_batches(path):
        for name, values in columns.items():
            offset = file_offset(values, base, size)
            if name == "flag":
                assert offset is None  # bit-packed bools are a copy: no span of the file
                continue
            assert data[offset : offset + values.nbytes] == values.tobytes(), name
            spans.append((offset, offset + values.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two columns share a byte
    assert file_offset(np.zeros(3), 0, size) is None  # memory outside the map


@pytest.mark.parametrize("labels", [None, {"label": "int64"}])
def test_arrow_files_are_the_same_bytes_with_direct_io(tmp_path, labels):
    features = cache_features({"h": 8}, 5, "float32", labels)
    rng = np.random.default_rng(0)
    batches = [
        {
            "h": rng.standard_normal((n, 5, 8), dtype=np.float32),
            "token_ids": rng.integers(0, 99, (n, 5), dtype=np.int32),
        }
        | ({"label": np.arange(n, dtype=np.int64)} if labels else {})
        for n in (3, 1, 17, 250)
    ]
    for direct in (False, True):
        writer = ArrowFileWriter(tmp_path / f"{direct}.arrow", features, direct_io=direct)
        for batch in batches:
            writer.write(batch)
        writer.close()
    assert (tmp_path / "True.arrow").read_bytes() == (tmp_path / "False.arrow").read_bytes()
    read = list(read_arrow_columns(tmp_path / "True.arrow"))
    assert all(np.array_equal(r["h"], b["h"]) for r, b in zip(read, batches, strict=True))


# -- targeted caches: variable-length token ids, positions, any label features ----------------------------


def test_targeted_columns_round_trip_through_load_from_disk(tmp_path):
    labels = Features(
        {"name": Value("string"), "known": ClassLabel(names=["no", "yes"]), "tags": Sequence(Value("string"))}
    )
    features = targeted_features({"blocks.0.hook_resid_post": 3}, 2, "float16", labels)
    rng = np.random.default_rng(0)
    token_ids = [np.array([0, 5, 6], np.int32), np.array([], np.int32), np.arange(40, dtype=np.int32)]
    acts = rng.standard_normal((3, 2, 3)).astype(np.float16)
    source = Dataset.from_dict(
        {"name": ["a", "b", None], "known": [1, 0, 1], "tags": [["x"], [], ["y", "z"]]}, features=labels
    )
    columns = {
        "token_ids": token_ids,
        "positions": np.array([[-1, 2], [0, 1], [38, 39]]),
        "blocks.0.hook_resid_post": acts,
        "source_index": np.array([7, 8, 9]),
    }
    table = source.with_format("arrow")[:]
    columns.update({c: table.column(c) for c in labels})
    name = data_file_name(0, 1)
    writer = ArrowFileWriter(tmp_path / name, features)
    writer.write_batch(mixed_record_batch(features, columns))
    writer.close()
    assert writer.rows == 3
    write_dataset_files(tmp_path, features, [name], fingerprint="0" * 16)
    back = datasets.load_from_disk(str(tmp_path))
    assert back.features == features
    assert [list(t) for t in back["token_ids"]] == [t.tolist() for t in token_ids]
    assert back["positions"] == [[-1, 2], [0, 1], [38, 39]] and back["source_index"] == [7, 8, 9]
    np.testing.assert_array_equal(back.with_format("numpy")["blocks.0.hook_resid_post"], acts)
    assert back["name"] == ["a", "b", None] and back["known"] == [1, 0, 1] and back["tags"] == [["x"], [], ["y", "z"]]
    with pytest.raises(TypeError, match="Arrow array"):
        mixed_record_batch(Features({"tags": Sequence(Value("string"))}), {"tags": [["x"]]})


def test_ragged_token_ids_keep_every_length():
    array = ragged_int32_array([np.array([1, 2, 3]), np.array([], np.int64), np.array([7])])
    assert array.type == pa.list_(pa.int32()) and array.to_pylist() == [[1, 2, 3], [], [7]]
    assert ragged_int32_array([]).to_pylist() == []
