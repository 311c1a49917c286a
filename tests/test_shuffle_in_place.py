"""The shuffle written in place (sae_cache.shuffle_in_place): every row written once, at its seeded place.

- The layout taken from pyarrow, filled by positioned writes in any order, gives exactly ArrowFileWriter's bytes.
- PositionedFiles (around the page cache or through it) writes exactly the bytes asked, across page edges, with
  files closed and reopened and a staging buffer smaller than a write.
- End to end, a cache written in place holds the unshuffled cache's rows in the shuffled order (rows sorted
  stably by their seeded keys, the order of the shuffle of shards), byte for byte as ArrowFileWriter writes
  them, with the same statistics; the order does not depend on the buffer size or on the number of ranks;
  large rows take this path with no patch; label columns ride along; an interrupted run resumes to the same
  bytes; float16 overflow still stops the run; SAELens reads the result.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ROW_BYTES, build_model, build_tokenizer, make_texts

from sae_cache import CacheActivationsRunner, direct_io
from sae_cache import plan as plan_module
from sae_cache.arrow_format import ArrowFileWriter, cache_features, lay_out_file
from sae_cache.direct_io import PositionedFiles
from sae_cache.metadata import METADATA_FILE
from sae_cache.plan import make_plan
from sae_cache.publish import RunPaths
from sae_cache.shuffle_in_place import row_places
from sae_cache.shuffle_io import row_order
from sae_cache.stats import HookStats, RunningStats

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def in_place(monkeypatch):
    """The tiny model's rows (about 2 KB) take the in-place path too."""
    monkeypatch.setattr(plan_module, "IN_PLACE_MIN_ROW_BYTES", 0)


def run(cfg, dataset, model):
    return CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()


def load(path) -> dict[str, np.ndarray]:
    return datasets.load_from_disk(str(path)).with_format("numpy")[:]


def data_files(path: Path) -> list[Path]:
    state = json.loads((path / "state.json").read_text())
    return [path / entry["filename"] for entry in state["_data_files"]]


def metadata(path: Path) -> dict:
    return json.loads((Path(path) / METADATA_FILE).read_text())


def write_reference(path: Path, features, columns: dict[str, np.ndarray], batch_rows: list[int]) -> bytes:
    """What ArrowFileWriter writes for these rows in record batches of batch_rows rows."""
    writer, start = ArrowFileWriter(path, features), 0
    for n in batch_rows:
        writer.write({name: values[start : start + n] for name, values in columns.items()})
        start += n
    writer.close()
    return path.read_bytes()


# -- the layout and the positioned writes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "hooks, dtype, labels",
    [
        ({"h": 8}, "float32", {}),
        ({"a": 8, "b": 3}, "float16", {"label": "int64", "score": "float64"}),
        ({"h": 5}, "float64", {"score": "float32"}),
    ],
)
def test_a_laid_out_file_filled_in_any_order_has_arrow_file_writer_bytes(tmp_path, hooks, dtype, labels):
    features = cache_features(hooks, 4, dtype, labels=labels)
    rng = np.random.default_rng(0)
    batch_rows = [4, 4, 3]
    columns = {h: rng.standard_normal((11, 4, d)).astype(dtype) for h, d in hooks.items()}
    columns["token_ids"] = rng.integers(0, 1000, (11, 4)).astype(np.int32)
    columns.update({name: rng.standard_normal(11).astype(kind) for name, kind in labels.items()})
    expected = write_reference(tmp_path / "reference.arrow", features, columns, batch_rows)

    fd = os.open(tmp_path / "placed.arrow", os.O_RDWR | os.O_CREAT)
    layout = lay_out_file(features, batch_rows, fd)
    assert os.path.getsize(tmp_path / "placed.arrow") == layout.size == len(expected)
    offsets = layout.offsets(np.arange(11))
    for row in rng.permutation(11):
        for c, name in enumerate(layout.columns):
            os.pwrite(fd, np.ascontiguousarray(columns[name][row]).tobytes(), int(offsets[row, c]))
    os.close(fd)
    assert (tmp_path / "placed.arrow").read_bytes() == expected
    assert np.array_equal(lay_out_file(features, batch_rows).value_offsets, layout.value_offsets)  # no fd: same


def test_bool_labels_are_bit_packed_so_rows_with_them_are_not_placed():
    with pytest.raises(RuntimeError, match="cannot be placed"):
        lay_out_file(cache_features({"h": 8}, 4, "float32", labels={"flag": "bool"}), [3])
    sizes = dict(hook_dims={"h": 4096}, context_size=16, seqpos_slice=(None,), training_tokens=16 * 100)
    sizes.update(dtype="float32", model_batch_size=5, buffer_size_gb=0.01, shuffle=True)
    assert make_plan(**sizes).shuffle_in_place
    assert not make_plan(**sizes, label_dtypes={"flag": "bool"}).shuffle_in_place
    assert not make_plan(**sizes, shuffle_across_sequences=True).shuffle_in_place


@pytest.mark.parametrize("direct", [True, False])
def test_positioned_files_write_exactly_the_bytes_asked(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(direct_io, "MAX_OPEN", 2)  # files are closed and reopened, and synced after
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 0)  # every whole page around the page cache
    rng = np.random.default_rng(1)
    sizes = [5 * direct_io.PAGE + 123, 3 * direct_io.PAGE, 40_000]
    expected = [np.zeros(n, np.uint8) for n in sizes]
    paths = [tmp_path / f"f{i}" for i in range(len(sizes))]
    for path, n in zip(paths, sizes):
        path.write_bytes(b"")
        os.truncate(path, n)
    files = PositionedFiles(paths, direct=direct, stage_bytes=direct_io.PAGE)  # a write spans several stagings
    for _ in range(60):
        f = int(rng.integers(len(sizes)))
        start = int(rng.integers(sizes[f]))
        data = rng.integers(0, 256, int(rng.integers(1, sizes[f] - start + 1)), dtype=np.uint8)
        files.write(f, start, data)
        expected[f][start : start + len(data)] = data
    files.write(0, 0, expected[0][: 2 * direct_io.PAGE])  # whole pages only
    files.sync()
    files.close()
    for path, want in zip(paths, expected):
        assert path.read_bytes() == want.tobytes()


def test_running_stats_on_the_device_add_exactly_as_the_host_did():
    rng = np.random.default_rng(2)
    items = torch.from_numpy(rng.standard_normal((50, 6)) * 1e3).abs()
    items[:, [0, 5]] = items[:, [0, 5]].round()  # counts: tokens and infs per item
    start = HookStats(n_tokens=7, total=1.25, total_sq=3.5, total_norm=2.0, max_abs=0.5, n_inf_after_cast=1)
    running, host = RunningStats(start, torch.device("cpu")), HookStats(**vars(start))
    for a, b in [(0, 3), (3, 3), (3, 20), (20, 50)]:
        running.add(items[a:b])
        if b > a:  # what HookStats.add did: a sum per range, added in Python floats
            tokens, total, total_sq, total_norm, _, infs = items[a:b].sum(0).tolist()
            host.n_tokens += int(tokens)
            host.total += total
            host.total_sq += total_sq
            host.total_norm += total_norm
            host.max_abs = max(host.max_abs, items[a:b, 4].max().item())
            host.n_inf_after_cast += int(infs)
    assert RunningStats.from_state(running.state().tolist()) == host


# -- end to end ---------------------------------------------------------------------------------------------


def test_the_cache_written_in_place_is_the_shuffled_stream(in_place, make_cfg, text_dataset, model, tmp_path):
    plain = make_cfg(new_cached_activations_path=str(tmp_path / "plain"), training_tokens=16 * 43)
    run(plain, text_dataset, model)
    cfg = make_cfg(shuffle=True, seed=11, training_tokens=16 * 43)
    runner = CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model)
    plan = runner.plan
    assert plan.shuffle_in_place and plan.peak_disk_bytes == plan.disk_bytes
    assert "shuffle written in place" in str(runner)
    runner.run()
    out = Path(cfg.new_cached_activations_path)

    order = row_order(11, plan.n_rows)
    expected = {name: values[order] for name, values in load(plain.new_cached_activations_path).items()}
    got = load(out)
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    assert np.array_equal(row_places(11, plan.n_rows)[order], np.arange(plan.n_rows))
    features = datasets.load_from_disk(str(out)).features
    for i, path in enumerate(data_files(out)):
        rows = {
            name: values[i * plan.rows_per_buffer : (i + 1) * plan.rows_per_buffer] for name, values in expected.items()
        }
        assert path.read_bytes() == write_reference(tmp_path / "ref.arrow", features, rows, plan.pieces_of_buffer(i))
    assert metadata(out)["hooks"] == metadata(plain.new_cached_activations_path)["hooks"]  # same sums, same order
    assert not RunPaths(out).work.exists()


def test_the_order_does_not_depend_on_the_buffer_size(in_place, make_cfg, text_dataset, model, tmp_path):
    caches = []
    for rows_per_buffer in (4, 7):
        cfg = make_cfg(
            shuffle=True,
            buffer_size_gb=rows_per_buffer * ROW_BYTES * 1.001 / 1e9,
            new_cached_activations_path=str(tmp_path / f"b{rows_per_buffer}"),
        )
        run(cfg, text_dataset, model)
        caches.append(load(cfg.new_cached_activations_path))
    assert all(np.array_equal(caches[0][name], caches[1][name]) for name in caches[0])


def test_the_shuffle_of_shards_and_the_one_in_place_store_the_same_order(
    make_cfg, text_dataset, model, tmp_path, monkeypatch
):
    shards = make_cfg(shuffle=True, new_cached_activations_path=str(tmp_path / "shards"))
    assert not CacheActivationsRunner(shards, override_dataset=text_dataset, model=model).plan.shuffle_in_place
    run(shards, text_dataset, model)
    monkeypatch.setattr(plan_module, "IN_PLACE_MIN_ROW_BYTES", 0)
    run(make_cfg(shuffle=True), text_dataset, model)
    a, b = load(tmp_path / "shards"), load(tmp_path / "cache")
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_large_rows_are_placed_with_no_patch(make_cfg, text_dataset, model, monkeypatch):
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 0)  # their whole pages go around the page cache too
    cfg = make_cfg(shuffle=True, dtype="float64", context_size=64, training_tokens=64 * 24)
    runner = CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model)
    assert runner.plan.bytes_per_row >= 16 << 10 and runner.plan.shuffle_in_place
    rows = runner.run().with_format("torch")[:]
    _, truth = model.run_with_cache(rows["token_ids"].long(), names_filter=[HOOK], prepend_bos=False)
    torch.testing.assert_close(rows[HOOK].float(), truth[HOOK], atol=1e-5, rtol=1e-5)
    assert len({tuple(t) for t in rows["token_ids"].tolist()}) == 24


def test_labels_ride_along_in_place(in_place, make_cfg, model):
    texts = make_texts(100, seed=3)
    data = datasets.Dataset.from_dict({"text": texts, "label": list(range(100)), "score": [i / 7 for i in range(100)]})
    cfg = make_cfg(
        shuffle=True, disable_concat_sequences=True, label_columns=["label", "score"], training_tokens=16 * 30
    )
    assert CacheActivationsRunner(cfg, override_dataset=data, model=model).plan.shuffle_in_place
    rows = run(cfg, data, model).with_format("torch")[:]
    assert rows["label"].tolist() != sorted(rows["label"].tolist())
    for tokens, label, score in zip(rows["token_ids"], rows["label"], rows["score"]):
        expected = model.to_tokens(texts[int(label)], prepend_bos=True, truncate=False)[0, :16]
        assert torch.equal(tokens.long(), expected) and score.item() == pytest.approx(int(label) / 7)


class _Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_bytes(in_place, make_cfg, text_dataset, model, tmp_path):
    reference = make_cfg(shuffle=True, new_cached_activations_path=str(tmp_path / "reference"))
    run(reference, text_dataset, model)
    calls = [0]

    def fail_at_sixth(module, args, output):
        calls[0] += 1
        if calls[0] == 1 + 6:  # the hook-width probe, then five forward passes
            raise _Interrupt

    cfg = make_cfg(shuffle=True)
    handle = model.blocks[0].register_forward_hook(fail_at_sixth)
    try:
        with pytest.raises(_Interrupt):
            run(cfg, text_dataset, model)
    finally:
        handle.remove()
    paths = RunPaths(Path(cfg.new_cached_activations_path))
    assert paths.layout.exists() and (paths.shards / "shard_00001.json").exists()  # 2 of 4 buffers complete
    assert not (paths.shards / "shard_00002.json").exists() and not paths.out.exists()
    run(make_cfg(shuffle=True, resume=True), text_dataset, model)
    for a, b in zip(data_files(paths.out), data_files(tmp_path / "reference"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert metadata(paths.out)["hooks"] == metadata(tmp_path / "reference")["hooks"]


def test_float16_overflow_stops_a_run_written_in_place(in_place, make_cfg, text_dataset, model):
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.W_E.mul_(1e6)
    cfg = make_cfg(shuffle=True, dtype="float16", hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="float16 range"):
        run(cfg, text_dataset, loud)
    shards = RunPaths(Path(cfg.new_cached_activations_path)).shards
    assert not list(shards.glob("*.json"))  # the first piece has infs: no buffer was completed
    warned = make_cfg(
        shuffle=True, dtype="float16", hook_name="blocks.0.hook_resid_pre", fp16_overflow="warn", resume=True
    )
    with pytest.warns(RuntimeWarning, match="float16 range"):
        rows = run(warned, text_dataset, loud).with_format("numpy")[:]
    assert np.isinf(rows["blocks.0.hook_resid_pre"]).any()


def test_saelens_reads_the_cache_written_in_place(in_place, make_cfg, text_dataset, model):
    from sae_lens.training.activations_store import ActivationsStore

    cfg = make_cfg(shuffle=True, seed=3)
    on_disk = run(cfg, text_dataset, model).with_format("torch")[:]
    store = ActivationsStore(
        model=None,  # type: ignore[arg-type]  # never used when reading cached activations
        dataset=None,
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=16,
        d_in=32,
        n_batches_in_buffer=2,
        total_training_tokens=10_000,
        store_batch_size_prompts=4,
        train_batch_size_tokens=64,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=cfg.new_cached_activations_path,
    )
    acts, ids = [], []
    for _ in range(10):
        a, t = store.get_raw_llm_batch(raise_on_epoch_end=True)
        acts.append(a.reshape(-1, 16, 32))
        ids.append(t.reshape(-1, 16))
    assert torch.equal(torch.cat(acts), on_disk[HOOK]) and torch.equal(
        torch.cat(ids).long(), on_disk["token_ids"].long()
    )


# -- several ranks -----------------------------------------------------------------------------------------

RANK_WORKER = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from datasets import Dataset
from conftest import build_model, build_tokenizer, make_texts
from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, plan

torch.set_num_threads(1)
plan.IN_PLACE_MIN_ROW_BYTES = 0
rank, world, init, options = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
data = Dataset.from_dict({{"text": make_texts(400)}})
model = build_model(build_tokenizer())
CacheActivationsRunner(CacheActivationsRunnerConfig(**options), override_dataset=data, model=model).run()
dist.destroy_process_group()
"""


def test_ranks_write_the_same_bytes_as_one_process(in_place, make_cfg, text_dataset, tmp_path):
    single = make_cfg(shuffle=True, training_tokens=16 * 43, new_cached_activations_path=str(tmp_path / "one"))
    run(single, text_dataset, build_model(build_tokenizer()))
    script = tmp_path / "rank_worker.py"
    script.write_text(RANK_WORKER.format(tests=str(Path(__file__).parent)))
    options = {**json.loads(json.dumps(single.to_dict())), "new_cached_activations_path": str(tmp_path / "two")}
    init = f"file://{tmp_path}/init"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", init, json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert metadata(tmp_path / "two")["world_size"] == 2
    for a, b in zip(data_files(tmp_path / "two"), data_files(tmp_path / "one"), strict=True):
        assert a.read_bytes() == b.read_bytes()
