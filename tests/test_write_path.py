"""The write path: buffers are filled and written in pieces, so host memory is a few pieces, not two buffers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, store
from sae_cache.plan import PIECE_BYTES, make_plan

HOOK = "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("buffer_gb", "d"),
    [(2.0, 768), (0.0671, 256), (1e-6, 32), (10.0, 4096)],
    ids=["default-2GB", "64MiB", "tiny", "10GB-wide"],
)
def test_pieces_cover_each_buffer_and_stay_small(buffer_gb, d):
    cfg = CacheActivationsRunnerConfig(
        hook_name=HOOK, training_tokens=3_000_000, context_size=128, buffer_size_gb=buffer_gb
    )
    plan = make_plan(
        context_size=128,
        hook_dims={HOOK: d},
        seqpos_slice=cfg.seqpos_slice,
        training_tokens=cfg.training_tokens,
        dtype=cfg.dtype,
        model_batch_size=cfg.model_batch_size,
        buffer_size_gb=cfg.buffer_size_gb,
        shuffle=cfg.shuffle,
    )
    assert plan.rows_per_piece >= 1
    assert plan.rows_per_piece * plan.bytes_per_row <= max(PIECE_BYTES, plan.bytes_per_row)
    assert plan.rows_per_piece <= max(1, -(-plan.rows_per_buffer // 4))
    for index in range(plan.n_buffers):
        pieces = plan.pieces_of_buffer(index)
        assert sum(pieces) == plan.rows_in_buffer(index)
        assert all(0 < p <= plan.rows_per_piece for p in pieces)


def test_each_shard_is_written_piece_by_piece_from_a_pool_of_three(model, text_dataset, make_cfg, monkeypatch):
    allocations = []
    real_new = store.ActivationsStore.new_piece

    def counted(self):
        tensors = real_new(self)
        allocations.append(len(tensors[HOOK]))
        return tensors

    monkeypatch.setattr(store.ActivationsStore, "new_piece", counted)
    cfg = make_cfg()  # 40 rows, 10 rows per buffer
    runner = CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model)
    ds = runner.run().with_format("torch")
    plan = runner.plan
    assert plan.rows_per_buffer == 10 and plan.rows_per_piece == 3
    assert allocations == [3, 3, 3]  # three pieces of host memory, reused for all 4 x 4 pieces
    files = sorted(Path(cfg.new_cached_activations_path).glob("*.arrow"))
    for f in files:
        with pa.memory_map(str(f)) as source:
            sizes = [b.num_rows for b in pa.ipc.open_stream(source)]
        assert sizes == [3, 3, 3, 1]  # one record batch per piece
    rows = ds[:]
    assert rows[HOOK].shape == (40, 16, 32)
    assert not torch.isnan(rows[HOOK]).any()
