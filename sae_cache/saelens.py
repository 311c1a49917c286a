"""SAELens training from a cache in any storage format, through one call: `training_runner(cfg, ...).run()`.

Owns the adapter between compact caches and SAELens. A float32/float16/float64 cache is SAELens's plain format:
`training_runner` returns SAELens's own `LanguageModelSAETrainingRunner(cfg, ...)`, untouched. A bfloat16 or int8
cache has no column named the hook (SAELens's plain loading refuses it rather than read bit patterns as numbers),
so the runner is built without SAELens opening the cache, and its ActivationsStore is then handed `DecodedRows`:
the object SAELens's cached path reads (`column_names`, `len`, row slices), whose rows are decoded by
`sae_cache.reader.CachedActivations` to SAELens's `dtype` on its activations device, as its own
`set_format("torch", dtype=..., device=...)` would give them. Nothing else of SAELens changes: the store reads
the cache row by row from row 0, mixes, filters `exclude_special_tokens` and checkpoints as it does for any cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_cache.columns import TOKEN_IDS
from sae_cache.reader import CachedActivations


class DecodedRows:
    """A cache's rows of one hook, as SAELens's cached path reads a `datasets.Dataset` formatted for torch.

    `rows[a:b]` gives `{hook: [rows, positions, d_in], "token_ids": [rows, positions]}`, both decoded to `dtype`
    on `device` (SAELens formats token ids in its dtype too).
    """

    def __init__(self, path: str | Path, hook: str, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.reader = CachedActivations(path)
        self.reader.d_in(hook)  # a ValueError naming the cache's hooks when it lacks this one
        self.hook, self.dtype, self.device = hook, dtype, torch.device(device)
        self.column_names = [self.hook, TOKEN_IDS]

    @property
    def shape(self) -> tuple[int, int]:
        """(positions, d_in) of one row: what SAELens checks against its context_size and d_in."""
        return self.reader.sliced_context_size, self.reader.d_in(self.hook)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, rows: slice) -> dict[str, torch.Tensor]:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("DecodedRows serves contiguous row slices (rows[a:b]), as SAELens reads them.")
        start, stop, _ = rows.indices(len(self))
        acts, tokens = self.reader.rows(start, max(start, stop), hook=self.hook, dtype=self.dtype, device=self.device)
        return {self.hook: acts, TOKEN_IDS: tokens.to(self.dtype)}


def training_runner(cfg: Any, **overrides: Any):
    """SAELens's `LanguageModelSAETrainingRunner(cfg, **overrides)`, for a cache of any storage format.

    `cfg` is a `LanguageModelSAERunnerConfig` with `use_cached_activations=True` and `cached_activations_path` a
    sae_cache cache; `overrides` are the runner's own (`override_model`, `override_dataset`, `override_sae`).
    """
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
    from sae_lens.util import str_to_dtype

    path = cfg.cached_activations_path
    if not cfg.use_cached_activations or path is None or _stored_plain(path, cfg.hook_name):
        return LanguageModelSAETrainingRunner(cfg, **overrides)
    rows = DecodedRows(path, cfg.hook_name, dtype=str_to_dtype(cfg.dtype), device=cfg.act_store_device)
    if rows.shape != (cfg.context_size, cfg.sae.d_in):
        raise ValueError(
            f"the cache's rows of {cfg.hook_name!r} are {rows.shape} (positions, d_in) but the SAELens config has "
            f"context_size={cfg.context_size}, d_in={cfg.sae.d_in}: set them to the cache's."
        )
    cfg.use_cached_activations = False  # SAELens opens no cache: it would find no column named the hook
    try:
        runner = LanguageModelSAETrainingRunner(cfg, **overrides)
    finally:
        cfg.use_cached_activations = True
    store = runner.activations_store
    store.cached_activations_path = str(path)
    store.cached_activation_dataset = rows  # what SAELens's own load_cached_activation_dataset sets
    store.current_row_idx = 0
    return runner


def _stored_plain(path: str | Path, hook: str) -> bool:
    """Whether SAELens reads `hook` of the cache at `path` itself: stored plain, or not there (SAELens says so)."""
    fmt = CachedActivations(path).formats.get(hook)
    return fmt is None or fmt.plain
