"""Compact caches end to end through the runner (tiny model, CPU): bfloat16 bit patterns and int8 with scales.

Each mode (rows in order, shuffled rows, positions shuffled across sequences) decodes to `run_with_cache` within
the format's documented error; a bfloat16 model loses nothing; every scale moves with its values; the bytes on
disk are what the plan says and within the targets against float32; statistics, resume, ranks, the Hub export,
`info` and plain `datasets` readers handle every format; float32 and float16 caches are unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tokenizer, make_texts
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, CachedActivations
from sae_cache.hub import push_cache
from sae_cache.info import describe
from sae_cache.metadata import METADATA_FILE
from sae_cache.publish import RunPaths

HOOK = "blocks.1.hook_resid_post"
HOOKS = [HOOK, "blocks.0.hook_mlp_out"]
FORMATS = ("float32", "bfloat16", "int8")
MODES = {
    "rows": dict(shuffle=False),
    "shuffled": dict(shuffle=True, seed=3),
    "across": dict(shuffle=True, seed=3, shuffle_across_sequences=True),
}


def config(out: Path, **overrides) -> CacheActivationsRunnerConfig:
    fields = dict(
        dataset_path="unused-override-given",
        model_name="tiny",
        model_batch_size=5,
        hook_name=HOOKS,
        training_tokens=16 * 40,
        context_size=16,
        new_cached_activations_path=str(out),
        device="cpu",
        buffer_size_gb=12 * 16 * 200 / 1e9,  # a few buffers per cache
    )
    return CacheActivationsRunnerConfig(**{**fields, **overrides})


def run(cfg, dataset, model):
    return CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()


def data_bytes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).glob("*.arrow"))}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, model, text_dataset) -> dict[tuple[str, str], Path]:
    """One cache per (format, mode), all of the same tokens and config otherwise."""
    base = tmp_path_factory.mktemp("compact")
    out = {}
    for name in FORMATS:
        for mode, options in MODES.items():
            out[name, mode] = base / f"{name}-{mode}"
            run(config(out[name, mode], dtype=name, **options), text_dataset, model)
    return out


def truth(model, token_ids: torch.Tensor, hook: str) -> torch.Tensor:
    _, cache = model.run_with_cache(token_ids.long(), names_filter=[hook])
    return cache[hook]


def within_format_error(name: str, decoded: torch.Tensor, exact: torch.Tensor) -> bool:
    """The documented error: none for float32, half a bfloat16 ulp, half an int8 step of the position's scale."""
    error = (decoded - exact).abs()
    if name == "float32":
        return bool(torch.allclose(decoded, exact, atol=1e-6))
    if name == "bfloat16":
        return bool((error <= exact.abs() * 2.0**-8 + 1e-30).all())
    half_step = exact.abs().amax(-1, keepdim=True) / 127 / 2
    return bool((error <= half_step * (1 + 1e-4) + 1e-6).all())


@pytest.mark.parametrize("mode", ["rows", "shuffled"])
@pytest.mark.parametrize("name", FORMATS)
def test_decoded_rows_equal_run_with_cache_within_the_format_error(caches, model, name, mode):
    reader = CachedActivations(caches[name, mode])
    assert sorted(reader.hook_names) == sorted(HOOKS)
    for hook in HOOKS:
        acts, token_ids = reader.rows(0, len(reader), hook=hook)
        assert acts.dtype == torch.float32 and acts.shape == (40, 16, 32)
        assert within_format_error(name, acts, truth(model, token_ids, hook))
    if name != "float32":
        relative = (acts - truth(model, token_ids, HOOKS[-1])).norm() / acts.norm()
        assert relative > 0  # something was rounded: the comparison can fail


def test_a_bfloat16_model_loses_nothing(model, text_dataset, tmp_path):
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    run(config(tmp_path / "bf16", dtype="bfloat16", shuffle=False), text_dataset, bf16_model)
    reader = CachedActivations(tmp_path / "bf16")
    for hook in HOOKS:
        acts, token_ids = reader.rows(0, len(reader), hook=hook, dtype=torch.bfloat16)
        for start in range(0, len(reader), 5):  # the cache's batches of model_batch_size rows
            exact = truth(bf16_model, token_ids[start : start + 5], hook)
            assert exact.dtype == torch.bfloat16
            assert torch.equal(acts[start : start + 5].view(torch.int16), exact.view(torch.int16))


def position_items(path: Path) -> list[bytes]:
    """Every stored position as the bytes of its token id and of every column of every hook, sorted."""
    table = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    n = table["token_ids"].size
    per_position = [v.reshape(n, -1) for v in table.values()]
    return sorted(b"".join(column[i].tobytes() for column in per_position) for i in range(n))


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_shuffles_move_each_scale_with_its_values(caches, name):
    rows = position_items(caches[name, "rows"])
    for mode in ("shuffled", "across"):
        assert position_items(caches[name, mode]) == rows  # the same (token, values, scale) positions
    ordered = datasets.load_from_disk(str(caches[name, "rows"]))["token_ids"]
    assert datasets.load_from_disk(str(caches[name, "across"]))["token_ids"] != ordered


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_a_shuffled_compact_cache_is_the_float32_one_encoded(caches, name):
    """Same seed, same order: each format's rows and positions sit where float32's do, decoded within its error."""
    for mode in ("shuffled", "across"):
        compact, plain = CachedActivations(caches[name, mode]), CachedActivations(caches["float32", mode])
        for hook in HOOKS:
            acts, token_ids = compact.rows(0, 40, hook=hook)
            exact, plain_ids = plain.rows(0, 40, hook=hook)
            assert torch.equal(token_ids, plain_ids)
            assert within_format_error(name, acts, exact)


def test_statistics_are_computed_before_encoding(caches):
    stats = {
        name: {
            h: v["stats"]
            for h, v in json.loads((caches[name, "shuffled"] / METADATA_FILE).read_text())["hooks"].items()
        }
        for name in FORMATS
    }
    assert stats["int8"] == stats["bfloat16"] == stats["float32"]


def test_reader_batches_decode_to_the_dtype_asked(caches):
    reader = CachedActivations(caches["int8", "rows"])
    rows, tokens = reader.rows(0, 40, hook=HOOK)
    in_order = list(reader.batches(96, hook=HOOK))
    assert torch.equal(torch.cat([a for a, _ in in_order]), rows.reshape(-1, 32)[: len(in_order) * 96])
    assert torch.equal(torch.cat([t for _, t in in_order]), tokens.reshape(-1)[: len(in_order) * 96])
    half = next(reader.batches(96, hook=HOOK, dtype=torch.float16))[0]
    assert half.dtype == torch.float16 and torch.equal(half, in_order[0][0].half())
    for start, stop in ((0, 0), (40, 40), (3, 17), (7, 8), (12, 40)):  # within and across record batches
        assert torch.equal(reader.rows(start, stop, hook=HOOK)[0], rows[start:stop])
    with pytest.raises(ValueError, match="not within"):
        reader.rows(30, 41, hook=HOOK)
    shuffled = torch.cat([a for a, _ in reader.batches(64, hook=HOOK, shuffle=True, seed=1)])
    key = lambda t: sorted(map(bytes, t.numpy()))  # noqa: E731
    assert key(shuffled) == key(rows.reshape(-1, 32))


def test_plain_readers_see_what_compact_columns_hold(caches):
    for name, values_dtype in (("bfloat16", "uint16"), ("int8", "int8")):
        ds = datasets.load_from_disk(str(caches[name, "rows"]))
        assert HOOK not in ds.column_names  # no column that looks like the activations
        suffix = ".bfloat16_bits" if name == "bfloat16" else ".int8"
        assert ds.features[HOOK + suffix] == datasets.Array2D(shape=(16, 32), dtype=values_dtype)
        assert "not plain floats" in ds.info.description and HOOK + suffix in ds.info.description
    assert datasets.load_from_disk(str(caches["int8", "rows"])).features[f"{HOOK}.scale"] == datasets.Sequence(
        datasets.Value("float32"), length=16
    )
    by_hand = datasets.load_from_disk(str(caches["bfloat16", "rows"])).with_format("numpy")[:]  # integers as int64
    bits = by_hand[f"{HOOK}.bfloat16_bits"].astype(np.uint16)
    decoded = torch.from_numpy(bits).view(torch.bfloat16).float()  # the recipe of the description
    assert torch.equal(decoded, CachedActivations(caches["bfloat16", "rows"]).rows(0, 40, hook=HOOK)[0])


def test_float32_and_float16_caches_keep_saelens_plain_format(caches, model, text_dataset, tmp_path):
    run(config(tmp_path / "half", dtype="float16", shuffle=False), text_dataset, model)
    for path, dtype in ((caches["float32", "rows"], "float32"), (tmp_path / "half", "float16")):
        ds = datasets.load_from_disk(str(path))
        assert sorted(ds.column_names) == sorted([*HOOKS, "token_ids"])
        assert all(ds.features[h] == datasets.Array2D(shape=(16, 32), dtype=dtype) for h in HOOKS)
        assert ds.info.description == ""


def test_info_shows_the_format_bytes_per_token_and_the_quality_note(caches):
    text = describe(caches["int8", "rows"])
    meta = json.loads((caches["int8", "rows"] / METADATA_FILE).read_text())
    per_token = (2 * (16 * (32 + 4) + 17 * 4) + 16 * 4) / 16  # two hooks' values, scales and offsets; token ids
    assert meta["storage"]["bytes_per_token"] == per_token and meta["storage"]["format"] == "int8"
    assert meta["hooks"][HOOK]["columns"] == [f"{HOOK}.int8", f"{HOOK}.scale"]
    assert "storage: int8" in text and f"bytes per token: {per_token:.1f}" in text and "docs/quality.md" in text
    assert "training_runner" in text
    assert "storage: float32" in describe(caches["float32", "rows"])


def wide_model() -> HookedTransformer:
    """One layer of a realistic width, so that offsets and scales weigh what they do in practice."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=256, n_heads=4, d_head=64, d_mlp=512, n_ctx=64, d_vocab=len(tokenizer), act_fn="gelu"
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def test_bytes_on_disk_against_float32(tmp_path):
    model, data = wide_model(), datasets.Dataset.from_dict({"text": make_texts(400)})
    plans, sizes = {}, {}
    for name in ("float32", "float16", "bfloat16", "int8"):
        cfg = config(
            tmp_path / name,
            dtype=name,
            hook_name="blocks.0.hook_resid_post",
            context_size=64,
            training_tokens=64 * 24,
            buffer_size_gb=8e-4,
            shuffle=True,  # rows of at least 16 KiB: the shuffle written in place
        )
        runner = CacheActivationsRunner(cfg, override_dataset=data, model=model)
        runner.run()
        plans[name] = runner.plan.disk_bytes
        sizes[name] = sum(p.stat().st_size for p in (tmp_path / name).glob("*.arrow"))
        assert plans[name] <= sizes[name] <= plans[name] + runner.plan.n_buffers * 4096  # plus schema and framing
    for name, limit in (("float16", 0.51), ("bfloat16", 0.51), ("int8", 0.27)):
        assert plans[name] / plans["float32"] <= limit and sizes[name] / sizes["float32"] <= limit, name
    exact = CachedActivations(tmp_path / "float32").rows(0, 24)[0]
    for name in ("bfloat16", "int8"):  # the shuffle written in place kept every scale with its values
        assert within_format_error(name, CachedActivations(tmp_path / name).rows(0, 24)[0], exact)


def test_an_interrupted_int8_run_resumes_to_the_same_bytes(model, text_dataset, tmp_path):
    passes = [0]

    def count_and_fail_on_the_fifth(module, inputs, output):
        if len(output) != 5:  # not a batch of rows: the one-row pass that reads the hooks' widths
            return
        passes[0] += 1
        if passes[0] == 5:
            raise RuntimeError("interrupted")

    small_buffers = 10 * (2 * (16 * (32 + 4) + 17 * 4) + 16 * 4) * 1.001 / 1e9  # two batches of 5 rows a shard
    options = dict(dtype="int8", shuffle=True, forward_threads=1, buffer_size_gb=small_buffers)
    handle = model.blocks[0].register_forward_hook(count_and_fail_on_the_fifth)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            run(config(tmp_path / "resumed", **options), text_dataset, model)
        passes[0] = 0
        run(config(tmp_path / "resumed", resume=True, **options), text_dataset, model)
    finally:
        handle.remove()
    assert passes[0] == 8 - 4  # the two complete shards (four batches) were not computed again
    run(config(tmp_path / "whole", **options), text_dataset, model)
    assert data_bytes(tmp_path / "resumed") == data_bytes(tmp_path / "whole")


def test_two_ranks_write_the_same_int8_cache_as_one_process(tmp_path):
    from test_distributed import options, run_ranks

    opts = options(tmp_path / "ranks", dtype="int8", shuffle=True, shuffle_across_sequences=True)
    run_ranks(2, opts, tmp_path)
    single = options(tmp_path / "single", dtype="int8", shuffle=True, shuffle_across_sequences=True)
    run_ranks(1, single, tmp_path)
    assert position_items(tmp_path / "ranks") == position_items(tmp_path / "single")  # each scale with its values
    assert datasets.load_from_disk(str(tmp_path / "ranks")).column_names == [
        "blocks.1.hook_resid_post.int8",
        "blocks.1.hook_resid_post.scale",
        "token_ids",
    ]


class ParquetApi:
    """A Hub stand-in that keeps the tables of the uploaded Parquet files (read while they exist)."""

    def __init__(self):
        self.tables = []

    def create_repo(self, repo_id, **kwargs):
        pass

    def upload_folder(self, *, folder_path, **kwargs):
        self.tables = [pq.read_table(p) for p in sorted(Path(folder_path).rglob("*.parquet"))]

    def upload_file(self, **kwargs):
        pass


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_the_hub_export_keeps_the_compact_columns_exactly(caches, name):
    path = caches[name, "shuffled"]
    api = ParquetApi()
    push_cache(path, repo_id="me/acts", export_dir=RunPaths(path).hub, config={}, num_shards=2, api=api)
    pushed = datasets.Dataset.from_dict(
        {c: sum((t.column(c).to_pylist() for t in api.tables), []) for c in api.tables[0].column_names}
    ).with_format("numpy")[:]
    stored = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    assert set(pushed) == set(stored)
    for column, values in stored.items():
        assert np.array_equal(np.asarray(pushed[column]).astype(values.dtype), values), column
    column, values_dtype = (f"{HOOK}.int8", "int8") if name == "int8" else (f"{HOOK}.bfloat16_bits", "uint16")
    for table in api.tables:  # the Parquet files carry the features: what the columns hold
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features[column]["dtype"] == values_dtype
