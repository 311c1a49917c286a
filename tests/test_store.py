"""The activations store (sae_cache.store) driven directly: a ModelAdapter, token rows and a plan in, pieces out.

Pieces hold exactly the plan's rows per buffer, equal to `run_with_cache` at the kept positions; a restart from
a buffer's last piece gives the same remaining pieces; excluded tokens' positions are dropped and nothing else;
labels ride along; the statistics are numpy's over what was yielded; float16 overflow raises or warns. The
plan's cutting of buffers into pieces is tested here too, since the store fills buffers by it.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import data_passes

from sae_cache import CacheActivationsRunnerConfig
from sae_cache.adapters import adapt
from sae_cache.columns import TOKEN_IDS
from sae_cache.plan import PIECE_BYTES, make_plan
from sae_cache.resolve import config_plan
from sae_cache.store import ActivationsStore, Float16OverflowError, Piece

HOOK = "blocks.1.hook_resid_post"
HOOKS = [HOOK, "blocks.0.attn.hook_z"]
BATCH = 5


@pytest.fixture(scope="module")
def adapter(model):
    return adapt(model)


@pytest.fixture(scope="module")
def rows(token_dataset) -> torch.Tensor:
    """200 token rows of 24 tokens."""
    return torch.tensor(token_dataset["input_ids"])


@pytest.fixture(scope="module")
def truth(model, rows) -> dict[str, torch.Tensor]:
    """run_with_cache over every row in batches of BATCH (as the store batches them), hooks flattened."""
    out = {h: [] for h in HOOKS}
    for start in range(0, len(rows), BATCH):
        _, cache = model.run_with_cache(rows[start : start + BATCH], names_filter=HOOKS)
        for h in HOOKS:
            out[h].append(cache[h].reshape(*cache[h].shape[:2], -1))
    return {h: torch.cat(v) for h, v in out.items()}


def plan_for(adapter, hooks, *, n_rows, rows_per_buffer, seqpos_slice=(None,), dtype="float32", context_size=24):
    """The plan of n_rows rows in buffers of rows_per_buffer rows (a multiple of BATCH, or fewer than it)."""
    fields = dict(
        hook_dims=adapter.hook_dims(hooks),
        context_size=context_size,
        seqpos_slice=seqpos_slice,
        dtype=dtype,
        model_batch_size=BATCH,
        shuffle=False,
    )
    bytes_per_row = make_plan(training_tokens=context_size, buffer_size_gb=1.0, **fields).bytes_per_row
    sliced = len(range(context_size)[slice(*seqpos_slice)])
    plan = make_plan(
        training_tokens=n_rows * sliced, buffer_size_gb=rows_per_buffer * bytes_per_row * 1.001 / 1e9, **fields
    )
    assert (plan.n_rows, plan.rows_per_buffer) == (n_rows, rows_per_buffer)
    return plan


def store_for(adapter, rows, plan, **options) -> ActivationsStore:
    return ActivationsStore(adapter, iter(rows), plan, batch_size=BATCH, **options)


def finished(pieces: list[Piece]) -> dict:
    """Each piece's finish() in order (what the writer does before writing it); the statistics at the last one."""
    stats = {}
    for piece in pieces:
        stats = piece.finish()
    return stats


def joined(pieces: list[Piece]) -> dict[str, np.ndarray]:
    """Every column of the pieces, concatenated in order (copies: the pieces' memory may be reused)."""
    return {name: np.concatenate([p.columns()[name] for p in pieces]) for name in pieces[0].tensors}


# -- pieces of buffers, equal to run_with_cache -----------------------------------------------------


@pytest.mark.parametrize("seqpos_slice", [(None,), (2, 20, 3)], ids=["all-positions", "seqpos-slice"])
@pytest.mark.parametrize("forward_threads", [1, 2])
def test_pieces_hold_the_plans_rows_equal_to_run_with_cache(adapter, model, rows, truth, seqpos_slice, forward_threads):
    plan = plan_for(adapter, HOOKS, n_rows=33, rows_per_buffer=10, seqpos_slice=seqpos_slice)
    consumed = []
    counted = (consumed.append(1) or row for row in rows)
    store = store_for(adapter, counted, plan, seqpos_slice=seqpos_slice, forward_threads=forward_threads)
    stored = []
    store.on_tokens = stored.append
    with data_passes(model) as passes:
        pieces = list(store.pieces())

    assert plan.rows_per_piece == 3 and plan.n_buffers == 4
    for index, group in itertools.groupby(pieces, key=lambda p: p.index):
        group = list(group)
        assert [p.n_rows for p in group] == plan.pieces_of_buffer(index)  # [3, 3, 3, 1], the last buffer [3]
        assert [(p.first, p.last) for p in group] == [(k == 0, k == len(group) - 1) for k in range(len(group))]
    assert [p.index for p in pieces if p.last] == list(range(plan.n_buffers))
    assert all(0 < p.n_rows <= plan.rows_per_piece for p in pieces)

    positions = slice(*seqpos_slice)
    columns = joined(pieces)
    assert columns[TOKEN_IDS].dtype == np.int32
    assert np.array_equal(columns[TOKEN_IDS], rows[:33, positions].numpy())
    for hook in HOOKS:
        assert np.array_equal(columns[hook], truth[hook][:33, positions].numpy()), hook
    assert sum(stored) == plan.n_tokens
    assert len(passes) == 7 and len(consumed) == 35  # no batch read or run beyond the last row needed
    assert (pieces[-1].next_batch, pieces[-1].next_skip) == (6, 3)  # 3 of the last batch's 5 rows were used


def test_piece_columns_are_views_of_its_host_tensors(adapter, rows):
    plan = plan_for(adapter, [HOOK], n_rows=10, rows_per_buffer=10)
    piece = next(store_for(adapter, rows, plan).pieces())
    view = piece.columns()
    assert view[HOOK].shape == (3, 24, 32) and len(piece.tensors[HOOK]) == plan.rows_per_piece
    assert np.shares_memory(view[HOOK], piece.tensors[HOOK].numpy())
    assert np.shares_memory(view[TOKEN_IDS], piece.tensors[TOKEN_IDS].numpy())


def test_acquire_supplies_the_host_memory_to_fill(adapter, rows, truth):
    """A pool of two sets of host tensors, reused in turn: each piece fills the one it is given."""
    plan = plan_for(adapter, [HOOK], n_rows=20, rows_per_buffer=10)
    store = store_for(adapter, rows, plan)
    pool = [store.new_piece(), store.new_piece()]
    turn = itertools.cycle(pool)
    made, got = [], []
    for piece in store.pieces(acquire=lambda make: made.append(make) or next(turn)):
        assert any(piece.tensors is tensors for tensors in pool)
        got.append(piece.columns()[HOOK].copy())
    assert np.array_equal(np.concatenate(got), truth[HOOK][:20].numpy())
    assert len(made) == 8 and all(make == store.new_piece for make in made)  # one acquire per piece


@pytest.mark.parametrize("exclude", [None, list(range(4, 60))], ids=["rows", "excluded-positions"])
def test_a_restart_from_a_buffers_last_piece_gives_the_same_remaining_pieces(adapter, rows, exclude):
    plan = plan_for(adapter, [HOOK], n_rows=33, rows_per_buffer=10)
    whole = list(store_for(adapter, rows, plan, exclude_token_ids=exclude).pieces())
    reference = [p.columns() for p in whole]
    if exclude:
        assert any(p.next_skip for p in whole if p.last)  # a buffer ended inside a batch: the skip is used
    for k, piece in enumerate(whole):
        if not piece.last or piece.index == plan.n_buffers - 1:
            continue
        store = store_for(adapter, rows, plan, exclude_token_ids=exclude)
        rest = list(store.pieces(piece.next_batch, piece.next_skip, piece.index + 1))
        assert [(p.index, p.n_rows, p.first, p.last) for p in rest] == [
            (p.index, p.n_rows, p.first, p.last) for p in whole[k + 1 :]
        ]
        for got, expected in zip(rest, reference[k + 1 :], strict=True):
            assert all(np.array_equal(got.columns()[name], expected[name]) for name in expected)
        assert (rest[-1].next_batch, rest[-1].next_skip) == (whole[-1].next_batch, whole[-1].next_skip)


def test_exclude_token_ids_drops_exactly_those_positions(adapter, rows, truth):
    exclude = [7, *range(4, 60, 2), 299]
    plan = plan_for(adapter, [HOOK], n_rows=20, rows_per_buffer=10)
    columns = joined(list(store_for(adapter, rows, plan, exclude_token_ids=exclude).pieces()))
    stream = rows.reshape(-1)
    keep = ~torch.isin(stream, torch.tensor(exclude))
    n_items = plan.n_rows * plan.sliced_context_size
    assert 0 < (~keep[:n_items]).sum() and keep.sum() > n_items
    assert np.array_equal(columns[TOKEN_IDS].reshape(-1), stream[keep][:n_items].numpy())
    expected = truth[HOOK].reshape(-1, 32)[keep][:n_items]
    assert np.array_equal(columns[HOOK].reshape(-1, 32), expected.numpy())


def test_labels_ride_along_with_their_rows(adapter, rows, truth):
    labeled = [(row, {"label": i, "score": i / 7, "flag": i % 3 == 0}) for i, row in enumerate(rows)]
    dtypes = {"label": "int64", "score": "float64", "flag": "bool"}
    plan = plan_for(adapter, [HOOK], n_rows=23, rows_per_buffer=10)
    columns = joined(list(store_for(adapter, labeled, plan, label_dtypes=dtypes).pieces()))
    assert columns["label"].dtype == np.int64 and np.array_equal(columns["label"], np.arange(23))
    assert columns["score"].dtype == np.float64 and np.array_equal(columns["score"], np.arange(23) / 7)
    assert columns["flag"].dtype == np.bool_ and np.array_equal(columns["flag"], np.arange(23) % 3 == 0)
    assert np.array_equal(columns[TOKEN_IDS], rows[:23].numpy())
    assert np.array_equal(columns[HOOK], truth[HOOK][:23].numpy())


# -- statistics ---------------------------------------------------------------------------------------


def numpy_stats(acts: np.ndarray) -> dict:
    acts = acts.astype(np.float64)
    return {
        "tokens_seen": acts.shape[0] * acts.shape[1],
        "mean": acts.mean(),
        "std": acts.std(),
        "mean_norm": np.linalg.norm(acts, axis=-1).mean(),
        "max_abs": np.abs(acts).max(),
        "inf_after_cast": 0,
    }


def assert_stats_equal(got: dict, expected: dict) -> None:
    assert got["tokens_seen"] == expected["tokens_seen"] and got["inf_after_cast"] == expected["inf_after_cast"]
    for key in ["mean", "std", "mean_norm", "max_abs"]:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("exclude", [None, [7, *range(4, 60, 2)]], ids=["rows", "excluded-positions"])
def test_statistics_are_numpys_over_what_was_yielded_and_survive_a_restart(adapter, rows, exclude):
    plan = plan_for(adapter, HOOKS, n_rows=27, rows_per_buffer=10, seqpos_slice=(1, None))
    options = dict(seqpos_slice=(1, None), exclude_token_ids=exclude)
    store = store_for(adapter, rows, plan, **options)
    pieces = list(store.pieces())
    columns = joined(pieces)
    final = finished(pieces)
    for hook, d in plan.hook_dims.items():
        assert_stats_equal(final[hook].to_dict(d), numpy_stats(columns[hook]))

    first = store_for(adapter, rows, plan, **options)  # stopped after buffer 0, then continued by another store
    stream = first.pieces()
    buffer_0 = []
    while not (buffer_0 and buffer_0[-1].last):
        buffer_0.append(next(stream))
    at_end = finished(buffer_0)
    stream.close()
    resumed = store_for(adapter, rows, plan, **options)
    resumed.restore_stats({hook: asdict(stats) for hook, stats in at_end.items()})
    again = finished(list(resumed.pieces(buffer_0[-1].next_batch, buffer_0[-1].next_skip, 1)))
    for hook, d in plan.hook_dims.items():
        assert_stats_equal(again[hook].to_dict(d), final[hook].to_dict(d))


@pytest.fixture(scope="module")
def loud(model):
    """The model with embeddings a million times larger: its early activations exceed float16's range."""
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.W_E.mul_(1e6)
    return adapt(loud)


def test_float16_overflow_raises_before_the_piece_holding_infs_is_written(loud, rows):
    """A piece is checked by its finish(), which the writer calls before writing any byte of it."""
    plan = plan_for(loud, ["blocks.0.hook_resid_pre"], n_rows=10, rows_per_buffer=10, dtype="float16")
    store = store_for(loud, rows, plan, dtype="float16")
    stream = store.pieces()
    with pytest.raises(
        Float16OverflowError, match=r"activations of hook 'blocks.0.hook_resid_pre' in buffer 0 exceed the float16"
    ):
        next(stream).finish()
    stream.close()
    assert issubclass(Float16OverflowError, ValueError)
    assert all(not hp.fwd_hooks for hp in loud.model.hook_dict.values())  # the failed run removed its hooks


def test_float16_overflow_warns_and_counts_the_infs_when_asked(loud, rows):
    plan = plan_for(loud, ["blocks.0.hook_resid_pre"], n_rows=10, rows_per_buffer=10, dtype="float16")
    store = store_for(loud, rows, plan, dtype="float16", fp16_overflow="warn")
    pieces = list(store.pieces())
    with pytest.warns(RuntimeWarning, match="float16 range"):
        final = finished(pieces)
    values = joined(pieces)["blocks.0.hook_resid_pre"]
    assert values.dtype == np.float16 and np.isinf(values).any()
    assert final["blocks.0.hook_resid_pre"].n_inf_after_cast == np.isinf(values).sum()


# -- running out of data ------------------------------------------------------------------------------


def test_a_dataset_that_runs_out_is_one_clear_error(adapter, rows):
    plan = plan_for(adapter, [HOOK], n_rows=20, rows_per_buffer=10)
    with pytest.raises(ValueError, match=r"the dataset ran out while filling buffer 1 \(2 of 3 items\)"):
        list(store_for(adapter, rows[:12], plan).pieces())
    with pytest.raises(ValueError, match="shorter than the part already cached"):
        list(store_for(adapter, rows[:8], plan).pieces(start_batch=2, start_index=1))


# -- the plan's pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffer_gb", "d"),
    [(2.0, 768), (0.0671, 256), (1e-6, 32), (10.0, 4096)],
    ids=["default-2GB", "64MiB", "tiny", "10GB-wide"],
)
def test_pieces_cover_each_buffer_and_stay_small(buffer_gb, d):
    cfg = CacheActivationsRunnerConfig(
        hook_name=HOOK, training_tokens=3_000_000, context_size=128, buffer_size_gb=buffer_gb
    )
    plan = config_plan(cfg, {HOOK: d}, 128)
    assert plan.rows_per_piece >= 1
    assert plan.rows_per_piece * plan.bytes_per_row <= max(PIECE_BYTES, plan.bytes_per_row)
    assert plan.rows_per_piece <= max(1, -(-plan.rows_per_buffer // 4))
    for index in range(plan.n_buffers):
        pieces = plan.pieces_of_buffer(index)
        assert sum(pieces) == plan.rows_in_buffer(index)
        assert all(0 < p <= plan.rows_per_piece for p in pieces)
