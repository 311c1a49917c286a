"""The runner: orchestration only, every stage in its own module.

`CacheActivationsRunner(cfg, override_dataset=None, model=None).run()` repairs what an interrupted
swap left, resolves the plan (sae_cache.resolve: model, data, hook widths, every check before any forward
pass), writes
one shard per buffer into the run's work directory (resuming after the last complete shard when
asked), links or shuffles the shards into a staged cache, publishes it, pushes it to the Hub when
asked, and returns the dataset as loaded from disk. A shuffle of large rows (`plan.shuffle_in_place`)
instead lays out the staged cache first and writes each row straight into its place. It hands each
stage the fields it needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from sae_cache import distributed, hub
from sae_cache.arrow_format import cache_features, fingerprint_of
from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.data import (
    row_tokenizer,
    token_rows,
    vocab_size,
)
from sae_cache.files import disk_full, read_json
from sae_cache.metadata import METADATA_FILE, activations_metadata, output_fields, run_identity
from sae_cache.plan import CachePlan
from sae_cache.publish import (
    RunPaths,
    ShardFiles,
    check_disk_space,
    check_output,
    continues_work,
    finish_staging,
    is_complete_cache,
    link_shards,
    publishing,
    remove_work,
    repair_interrupted_swap,
    start_work,
)
from sae_cache.resolve import Resolved, resolve
from sae_cache.shuffle import shuffle_shards
from sae_cache.shuffle_in_place import PlacedWriter, file_names, lay_out_once
from sae_cache.stats import HookStats
from sae_cache.store import ActivationsStore
from sae_cache.writer import PieceWriter, ShardWriter

logger = logging.getLogger("sae_cache")


class CacheActivationsRunner:
    """Caches the activations described by a CacheActivationsRunnerConfig to disk."""

    def __init__(
        self, cfg: CacheActivationsRunnerConfig, override_dataset: Any = None, model: Any = None, tokenizer: Any = None
    ) -> None:
        """`model`: a model to use instead of loading cfg.model_name (TransformerLens HookedTransformer or
        TransformerBridge, transformers PreTrainedModel, SAELens HookedProxyLM); `tokenizer`: the tokenizer of a
        transformers model (default: found under the model's name or path)."""
        self.cfg = cfg
        self.override_dataset = override_dataset
        self._model, self._tokenizer = model, tokenizer
        self._resolved: Resolved | None = None
        self.paths = RunPaths(Path(cfg.new_cached_activations_path))  # type: ignore[arg-type]
        self.computed_tokens = 0  # tokens run() put through the model (less than the plan's when it resumed)

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
            self._shared(self._lay_out)
            self._shared(self._write_shards)
            self._shared(self._publish)
        self._shared(lambda: self._push() if self.cfg.hf_repo_id and self.ranks.is_main else None)
        self._shared(lambda: remove_work(self.paths) if self.ranks.is_main else None)
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
        cfg = self.cfg
        check_output(self.paths, field="new_cached_activations_path", overwrite=cfg.overwrite, resume=cfg.resume)
        plan = self._resolve().plan
        if self.ranks.is_main:
            identity = run_identity(cfg, plan)
            rows, written = self._written() if continues_work(self.paths, identity, resume=cfg.resume) else (0, 0)
            check_disk_space(self.paths.out, plan.peak_disk_bytes, written)
            logger.info("%s", self)
            with disk_full(f"starting the run in {self.paths.work}", "nothing was computed yet"):
                start_work(self.paths, identity, overwrite=cfg.overwrite, resume=cfg.resume)
            self.computed_tokens = plan.n_tokens - rows * plan.sliced_context_size

    def _written(self) -> tuple[int, int]:
        """Rows and bytes of every rank's complete buffers: what a resumed run keeps."""
        plan = self._resolve().plan
        done = [
            self._shard_files(r).written(self._rank_plan(r).n_buffers, plan.bytes_per_row)
            for r in range(self.ranks.world)
        ]
        return sum(rows for rows, _ in done), sum(size for _, size in done)

    def _resolve(self) -> Resolved:
        if self._resolved is None:
            self._resolved = resolve(
                self.cfg, override_dataset=self.override_dataset, model=self._model, tokenizer=self._tokenizer
            )
        return self._resolved

    def _already_finished(self) -> bool:
        """With resume=True: the run was killed after publishing its cache (only clean-up and upload remain)."""
        out = self.paths.out
        if not self.cfg.resume or not is_complete_cache(out):
            return False
        previous = read_json(out / METADATA_FILE).get("config", {})
        if any(previous.get(k) != v for k, v in output_fields(self.cfg).items()):
            return False
        logger.info("%s is already complete for this configuration", out)
        return True

    # -- shards -------------------------------------------------------------------------------------

    def _features(self):
        resolved = self._resolve()
        plan = resolved.plan
        return cache_features(plan.hook_dims, plan.sliced_context_size, self.cfg.dtype, labels=resolved.labels)

    def _rank_plan(self, rank: int) -> CachePlan:
        plan = self._resolve().plan
        share = distributed.Ranks(rank, self.ranks.world)
        return plan.with_rows(distributed.rows_of_rank(plan.n_rows, self.cfg.model_batch_size, share))

    def _shard_files(self, rank: int):
        return self.paths.shard_files(rank if self.ranks.active else None)

    def _write_shards(self) -> None:
        """Compute this rank's buffers not yet on disk and write them as shards (the writer overlaps the compute)."""
        plan = self._rank_plan(self.ranks.rank)
        files = self._shard_files(self.ranks.rank)
        files.directory.mkdir(parents=True, exist_ok=True)
        writer = self._writer(files)
        done = files.n_complete(plan.n_buffers)
        if done:
            logger.info("resuming after %d complete shard(s) of %d", done, plan.n_buffers)
        resume = files.read_manifest(done - 1) if done else {"next_batch": 0, "next_skip": 0, "stats": {}}
        store = self._make_store(plan)
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
            for piece in store.pieces(resume["next_batch"], resume["next_skip"], done, acquire=writer.acquire):
                writer.submit(piece)

    def _lay_out(self) -> None:
        """Rank 0, for the shuffle written in place: the staged cache's data files, laid out once per run."""
        if self.ranks.is_main and self._resolve().plan.shuffle_in_place:
            with disk_full(f"laying out the cache's data files in {self.paths.staging}", "nothing was computed yet"):
                lay_out_once(self.paths, self._features(), self._resolve().plan)

    def _writer(self, files: ShardFiles) -> PieceWriter:
        cfg, plan = self.cfg, self._resolve().plan
        if plan.shuffle_in_place:
            return PlacedWriter(
                files,
                self.paths.staging,
                self._features(),
                plan,
                seed=cfg.seed,
                batch_size=cfg.model_batch_size,
                ranks=self.ranks,
                direct_io=cfg.direct_io,
            )
        # shards to be shuffled are read back at once: only final ones go around the page cache
        return ShardWriter(files, self._features(), direct_io=cfg.direct_io and not cfg.shuffle)

    def _make_store(self, plan: CachePlan) -> ActivationsStore:
        cfg, resolved = self.cfg, self._resolve()
        rows = token_rows(
            resolved.dataset,
            resolved.column,
            tokenize=row_tokenizer(resolved.model, chat=cfg.use_chat_formatting),
            context_size=plan.context_size,
            special=resolved.special,
            disable_concat=cfg.disable_concat_sequences,
            label_columns=cfg.label_columns,
            vocab=vocab_size(resolved.model.tokenizer),
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

    def _rank_shards(self) -> list[Path]:
        """Every rank's shard files, in rank order."""
        paths = []
        for rank in range(self.ranks.world):
            files = self._shard_files(rank)
            paths += [files.shard(i) for i in range(self._rank_plan(rank).n_buffers)]
        return paths

    def _stats(self) -> dict[str, HookStats]:
        """The statistics of the whole cache, from every rank's last manifest."""
        last = [(self._shard_files(rank), self._rank_plan(rank).n_buffers) for rank in range(self.ranks.world)]
        raws = [files.read_manifest(n - 1)["stats"] for files, n in last if n]
        return {h: HookStats.combined([raw[h] for raw in raws]) for h in self._resolve().plan.hook_dims}

    def _publish(self) -> None:
        """Rank 0: link (or shuffle) every rank's shards into a staged cache (or complete the one written in
        place) and publish it."""
        if not self.ranks.is_main:
            return
        cfg, resolved = self.cfg, self._resolve()
        plan, features = resolved.plan, self._features()
        metadata = activations_metadata(
            cfg, plan, stats=self._stats(), tokenizer=resolved.model.tokenizer, world_size=self.ranks.world
        )
        doing = f"{'shuffling' if cfg.shuffle else 'publishing'} the cache in {self.paths.work}"
        kept = f"the {plan.n_buffers} complete {'buffer' if plan.shuffle_in_place else 'shard'}(s) are kept"
        with disk_full(doing, kept), publishing(self.paths, fresh=not plan.shuffle_in_place) as staging:
            if plan.shuffle_in_place:
                names = file_names(plan)
            elif cfg.shuffle:
                names = shuffle_shards(
                    self._rank_shards(),
                    features=features,
                    seed=cfg.seed,
                    across_sequences=cfg.shuffle_across_sequences,
                    rows_per_file=plan.rows_per_buffer,
                    n_rows=plan.n_rows,
                    bucket_dir=self.paths.buckets,
                    out_dir=staging,
                    bucket_bytes=plan.rows_per_buffer * plan.bytes_per_row // 4,
                    direct_io=cfg.direct_io,
                )
            else:
                names = link_shards(self._rank_shards(), staging)
            finish_staging(staging, features, names, fingerprint_of(run_identity(cfg, plan)), metadata)

    def _push(self) -> None:
        cfg = self.cfg
        with disk_full(
            f"exporting the cache for the Hub in {self.paths.hub}", f"the cache at {self.paths.out} is complete"
        ):
            hub.push_cache(
                self.paths.out,
                repo_id=cfg.hf_repo_id,  # type: ignore[arg-type]
                export_dir=self.paths.hub,
                config=cfg.to_dict(),
                num_shards=cfg.hf_num_shards,
                revision=cfg.hf_revision,
                private=cfg.hf_is_private_repo,
            )
