"""The runner: orchestration only, every stage in its own module.

`CacheActivationsRunner(cfg, override_dataset=None, model=None).run()` repairs what an interrupted
swap left, resolves the plan (model, data, hook widths) and checks it before any forward pass, writes
one shard per buffer into the run's temporary directory (resuming after the last complete shard
when asked), consolidates or shuffles the shards into a staged cache, swaps it into place, pushes it
to the Hub when asked, and returns the dataset as loaded from disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from sae_cache import distributed, hub
from sae_cache.arrow_format import METADATA_FILE, cache_features, fingerprint_of, read_json, write_json_atomic
from sae_cache.config import UNSET, CacheActivationsRunnerConfig
from sae_cache.consolidate import (
    RunPaths,
    finish_staging,
    is_complete_cache,
    is_empty_dir,
    remove_work,
    repair_interrupted_swap,
    reset_dir,
    stage_shards,
    swap_into_place,
)
from sae_cache.data import (
    SpecialTokens,
    check_dataset_size,
    find_column,
    first_row,
    label_dtypes,
    open_dataset,
    resolve_context_size,
    resolve_special_tokens,
    token_rows,
)
from sae_cache.metadata import build_metadata, output_fields
from sae_cache.model import check_hook_names, load_model, model_device, probe_hook_dims
from sae_cache.plan import CachePlan, make_plan
from sae_cache.shuffle import shuffle_shards
from sae_cache.store import ActivationsStore, HookStats, resolve_forward_threads
from sae_cache.writer import ShardWriter

logger = logging.getLogger("sae_cache")
DISK_MARGIN = 1.05


@dataclass
class _Resolved:
    """What the model and the data told us, resolved once before any work."""

    model: Any
    dataset: Any
    column: Any
    special: SpecialTokens
    labels: dict[str, str]
    plan: CachePlan
    forward_threads: int


class CacheActivationsRunner:
    """Caches the activations described by a CacheActivationsRunnerConfig to disk."""

    def __init__(self, cfg: CacheActivationsRunnerConfig, override_dataset: Any = None, model: Any = None) -> None:
        self.cfg = cfg
        self.override_dataset = override_dataset
        self._model = model
        self._resolved: _Resolved | None = None
        self.paths = RunPaths(Path(cfg.new_cached_activations_path))  # type: ignore[arg-type]

    @property
    def plan(self) -> CachePlan:
        """The resolved plan (loads the model and peeks at the data on first use)."""
        return self._resolve().plan

    def __str__(self) -> str:
        return f"sae_cache run -> {self.paths.out}\n{self.plan.describe()}"

    @torch.no_grad()
    def run(self) -> datasets.Dataset:
        """Cache the activations and return the finished cache as loaded from disk.

        Under an initialised torch.distributed process group every rank calls run(): each computes its
        own batches into its own shards, and rank 0 publishes (see sae_cache.distributed).
        """
        started = time.perf_counter()
        self.ranks = distributed.current()
        self._shared(self._repair)
        if not self._already_finished():
            self._shared(self._prepare)
            self._shared(self._write_shards)
            self._shared(self._publish)
        self._shared(lambda: remove_work(self.paths) if self.ranks.is_main else None)
        self._shared(
            lambda: hub.push_cache(self.paths.out, self.cfg) if self.cfg.hf_repo_id and self.ranks.is_main else None
        )
        self.elapsed_s = time.perf_counter() - started
        return datasets.load_from_disk(str(self.paths.out))

    def _shared(self, step: Callable[[], None]) -> None:
        """Run one step on every rank; if any rank fails, every rank raises (none waits forever)."""
        error: BaseException | None = None
        try:
            step()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        if not distributed.all_ok(self.ranks, error is None):
            raise error or RuntimeError("another rank failed; its error is in its own output")

    def _repair(self) -> None:
        if self.ranks.is_main:
            repaired = repair_interrupted_swap(self.paths.out)
            if repaired:
                logger.warning("%s", repaired)

    def _prepare(self) -> None:
        """Every check that can fail before a forward pass; rank 0 then creates (or reopens) the work directory."""
        self._check_output_dir()
        resolved = self._resolve()
        if self.ranks.is_main:
            self._check_disk_space(resolved.plan)
            logger.info("%s", self)
            self._start_work(resolved.plan)

    # -- resolution and checks (before any forward pass) -------------------------------------------

    def _resolve(self) -> _Resolved:
        if self._resolved is not None:
            return self._resolved
        cfg = self.cfg
        dataset = open_dataset(cfg, self.override_dataset)
        column = find_column(first_row(dataset), chat=cfg.use_chat_formatting)
        context_size = resolve_context_size(cfg, column, first_row(dataset))
        model = self._model if self._model is not None else load_model(cfg)
        check_hook_names(model, cfg.hook_names)
        self._check_model_context(model, context_size)
        hook_dims = probe_hook_dims(model, cfg.hook_names)
        self._check_d_in(hook_dims)
        special = resolve_special_tokens(cfg, getattr(model, "tokenizer", None))
        labels = label_dtypes(dataset, column, cfg, first_row(dataset))
        plan = make_plan(cfg, context_size=context_size, hook_dims=hook_dims)
        if not cfg.use_chat_formatting:
            warning = check_dataset_size(
                dataset, column, rows_needed=plan.n_rows, context_size=context_size, model=model
            )
            if warning:
                warnings.warn(warning, RuntimeWarning, stacklevel=2)
        threads = resolve_forward_threads(cfg.forward_threads, model_device(model))
        self._resolved = _Resolved(
            model=model,
            dataset=dataset,
            column=column,
            special=special,
            labels=labels,
            plan=plan,
            forward_threads=threads,
        )
        return self._resolved

    def _check_model_context(self, model: Any, context_size: int) -> None:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if n_ctx is not None and context_size > n_ctx:
            raise ValueError(
                f"context_size={context_size} exceeds the model's n_ctx={n_ctx}: set context_size <= {n_ctx}."
            )

    def _check_d_in(self, hook_dims: dict[str, int]) -> None:
        if self.cfg.d_in == UNSET:
            return
        wrong = {h: d for h, d in hook_dims.items() if d != self.cfg.d_in}
        if wrong:
            raise ValueError(
                f"d_in={self.cfg.d_in} but the model's hooks have widths {wrong}: set d_in to match, or -1."
            )

    def _already_finished(self) -> bool:
        """With resume=True: the run was killed after publishing its cache (only clean-up and upload remain)."""
        out = self.paths.out
        if not self.cfg.resume or not is_complete_cache(out):
            return False
        previous = read_json(out / METADATA_FILE).get("config", {})
        ours = json.loads(json.dumps(output_fields(self.cfg), default=str))
        if any(previous.get(k) != v for k, v in ours.items()):
            return False
        logger.info("%s is already complete for this configuration", out)
        return True

    def _check_output_dir(self) -> None:
        out = self.paths.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"new_cached_activations_path={str(out)!r} is a file: choose a directory path.")
        if out.exists() and not is_empty_dir(out) and not (self.cfg.overwrite or self._resuming_an_overwrite()):
            what = "a finished cache" if is_complete_cache(out) else "other files"
            raise ValueError(f"{out} already holds {what}: pass overwrite=True to replace it, or choose another path.")
        if self.paths.work.exists() and not (self.cfg.resume or self.cfg.overwrite):
            raise ValueError(
                f"{self.paths.work} holds an interrupted run: pass resume=True to continue it or overwrite=True to start over."
            )

    def _resuming_an_overwrite(self) -> bool:
        """resume=True continuing a run that was started with overwrite=True."""
        run_file = self.paths.run_file
        return self.cfg.resume and run_file.exists() and bool(read_json(run_file).get("overwrite"))

    def _check_disk_space(self, plan: CachePlan) -> None:
        anchor = self.paths.out
        while not anchor.exists():
            anchor = anchor.parent
        free = shutil.disk_usage(anchor).free
        needed = int(plan.peak_disk_bytes * DISK_MARGIN)
        if free < needed:
            raise OSError(
                f"not enough disk space at {anchor}: the cache needs up to {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
                "are free. Lower training_tokens, use dtype='float16', or choose another new_cached_activations_path."
            )

    # -- shards -------------------------------------------------------------------------------------

    def _features(self):
        resolved = self._resolve()
        plan = resolved.plan
        return cache_features(plan.hook_dims, plan.sliced_context_size, self.cfg.dtype, labels=resolved.labels)

    def _shard_dir(self, rank: int) -> Path:
        return self.paths.shards / f"rank_{rank:05d}" if self.ranks.active else self.paths.shards

    def _rank_plan(self, rank: int) -> CachePlan:
        plan = self._resolve().plan
        share = distributed.Ranks(rank, self.ranks.world)
        return plan.with_rows(distributed.rows_of_rank(plan.n_rows, self.cfg.model_batch_size, share))

    def _write_shards(self) -> None:
        """Compute this rank's buffers not yet on disk and write them as shards (the writer overlaps the compute)."""
        resolved = self._resolve()
        plan = self._rank_plan(self.ranks.rank)
        features = self._features()
        self._shard_dir(self.ranks.rank).mkdir(parents=True, exist_ok=True)
        # shards to be shuffled are read back at once: only final ones go around the page cache
        writer = ShardWriter(
            self._shard_dir(self.ranks.rank), features, direct_io=self.cfg.direct_io and not self.cfg.shuffle
        )
        done = writer.complete_shards(plan.n_buffers)
        if done:
            logger.info("resuming after %d complete shard(s) of %d", done, plan.n_buffers)
        resume = writer.read_manifest(done - 1) if done else {"next_batch": 0, "next_skip": 0, "stats": {}}
        store = self._make_store(resolved, plan)
        store.restore_stats(resume["stats"])
        progress = tqdm(
            total=plan.n_tokens,
            initial=done * plan.tokens_per_buffer,
            unit="tok",
            desc="Caching",
            unit_scale=True,
            disable=not self.ranks.is_main,
        )
        store.on_tokens = progress.update
        with writer, progress:
            for buffer in store.buffers(resume["next_batch"], resume["next_skip"], done, acquire=writer.acquire):
                writer.submit(buffer, {"stats": {h: asdict(st) for h, st in store.stats.items()}})

    def _start_work(self, plan: CachePlan) -> None:
        """Create the run's work directory, or check that the one there may be resumed."""
        identity = json.loads(json.dumps({"fields": output_fields(self.cfg), "plan": plan.to_dict()}, default=str))
        if self.paths.work.exists() and self.cfg.resume:
            previous = read_json(self.paths.run_file) if self.paths.run_file.exists() else {}
            changed = sorted(
                k for k in identity["fields"] if previous.get("fields", {}).get(k) != identity["fields"][k]
            )
            if changed or previous.get("plan") != identity["plan"]:
                raise ValueError(
                    f"cannot resume {self.paths.work}: the configuration changed in {changed or 'the resolved plan'}. "
                    "Rerun with the original values, or pass overwrite=True to start over."
                )
            return
        reset_dir(self.paths.work)
        self.paths.shards.mkdir()
        write_json_atomic(self.paths.run_file, {**identity, "overwrite": self.cfg.overwrite})

    def _make_store(self, resolved: _Resolved, plan: CachePlan) -> ActivationsStore:
        cfg = self.cfg
        rows = token_rows(
            resolved.dataset,
            resolved.column,
            model=resolved.model,
            cfg=cfg,
            context_size=plan.context_size,
            special=resolved.special,
        )
        return ActivationsStore(
            resolved.model,
            distributed.batches_of_rank(rows, cfg.model_batch_size, self.ranks),
            plan,
            batch_size=cfg.model_batch_size,
            seqpos_slice=cfg.seqpos_slice,
            dtype=cfg.dtype,
            autocast=cfg.autocast_lm,
            model_kwargs=cfg.model_kwargs,
            exclude_token_ids=resolved.special.excluded,
            fp16_overflow=cfg.fp16_overflow,
            label_dtypes=resolved.labels,
            forward_threads=resolved.forward_threads,
        )

    # -- publishing ---------------------------------------------------------------------------------

    def _rank_shards(self) -> tuple[list[Path], dict[str, HookStats]]:
        """Every rank's shard files in rank order, and the statistics of all of them."""
        files, raws = [], []
        for rank in range(self.ranks.world):
            writer = ShardWriter(self._shard_dir(rank), features=None, background=False)  # type: ignore[arg-type]
            n = self._rank_plan(rank).n_buffers
            files += [writer.shard_path(i) for i in range(n)]
            if n:
                raws.append(writer.read_manifest(n - 1)["stats"])
        hooks = self._resolve().plan.hook_dims
        return files, {h: HookStats.combined([raw[h] for raw in raws]) for h in hooks}

    def _publish(self) -> None:
        """Rank 0: consolidate (or shuffle) every rank's shards into a staged cache and swap it into place."""
        if not self.ranks.is_main:
            return
        cfg, plan = self.cfg, self._resolve().plan
        shard_files, stats = self._rank_shards()
        features = self._features()
        staging = self.paths.staging
        if cfg.shuffle:
            reset_dir(staging)
            names = shuffle_shards(
                shard_files,
                features=features,
                seed=cfg.seed,
                across_sequences=cfg.shuffle_across_sequences,
                rows_per_file=plan.rows_per_buffer,
                n_rows=plan.n_rows,
                scratch=self.paths.scratch,
                out_dir=staging,
                bucket_bytes=plan.rows_per_buffer * plan.bytes_per_row // 4,
                direct_io=cfg.direct_io,
            )
        else:
            names = stage_shards(shard_files, staging)
        tokenizer = getattr(self._resolve().model, "tokenizer", None)
        metadata = build_metadata(cfg, plan, stats=stats, tokenizer=tokenizer, world_size=self.ranks.world)
        finish_staging(
            staging, features, names, fingerprint_of({"fields": output_fields(cfg), "plan": plan.to_dict()}), metadata
        )
        swap_into_place(staging, self.paths.out)
