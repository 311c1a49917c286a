"""Position-targeted caching: activations at a target substring's tokens, one row per prompt, with labels.

Owns `TargetedCacheConfig` and `cache_targeted`: for input rows of (prompt, target substring, label
columns), length-sorted right-padded batches cut at each prompt's last cached token, one capture per
batch with an automatic batch size (halved on CUDA out-of-memory), and the rows in input (or seeded
shuffled) order with their labels. target_spans finds the cached positions (pure), arrow_format owns
the columns' layout; the output check, publishing and metadata are the runner's own (sae_cache.publish,
sae_cache.metadata): only the data differs. docs/targeted.md explains the choices and the measured
padding savings.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from sae_cache.adapters import adapt
from sae_cache.arrow_format import (
    ArrowFileWriter,
    data_file_name,
    fingerprint_of,
    mixed_record_batch,
    targeted_features,
)
from sae_cache.checks import check_field_types, check_minimums, check_output_path
from sae_cache.columns import POSITIONS, RESERVED, SOURCE_INDEX, TOKEN_IDS
from sae_cache.config import STORAGE_DTYPES
from sae_cache.metadata import build_metadata
from sae_cache.model import ModelAdapter
from sae_cache.publish import (
    RunPaths,
    check_output,
    finish_staging,
    publishing,
    remove_work,
    repair_interrupted_swap,
    reset_dir,
)
from sae_cache.target_spans import LocatedPrompt, locate_prompts

logger = logging.getLogger("sae_cache")
CHOICES = {"occurrence": ("first", "last"), "short_span": ("pad", "skip"), "output_order": ("input", "shuffle")}
FILE_BYTES = 256 * 2**20  # activation bytes per data file


@dataclass
class TargetedCacheConfig:
    """Which prompts, which tokens of them, which hooks, and where the cache goes."""

    output_path: str
    """Directory of the cache, published atomically; `datasets.load_from_disk` opens it."""

    hook_names: list[str] | str
    """Hook name(s) recorded in one forward pass (a list or a comma-separated string); one column each."""

    prompt_column: str = "prompt"
    """Input column holding the prompt text."""

    target_column: str = "target"
    """Input column holding the substring whose tokens are cached (matched exactly, case-sensitive)."""

    label_columns: list[str] = field(default_factory=list)
    """Input columns copied unchanged into each output row (any datasets feature type)."""

    n_positions: int = 1
    """Cache the last n_positions tokens of the target's token span (1: its final token)."""

    occurrence: str = "first"
    """Where a target occurring more than once is taken: "first" or "last" (rows with several are counted)."""

    short_span: str = "pad"
    """A span of fewer than n_positions tokens: "pad" (left-pad positions with -1 and activations with zeros) or "skip"
    the row."""

    prepend_bos: bool | None = None
    """Put the BOS token before each prompt; None follows the model's default_prepend_bos."""

    batch_size: int = 32
    """Prompts per forward pass (the first size tried when auto_batch_size)."""

    auto_batch_size: bool = True
    """On CUDA out-of-memory, halve the batch and go on; the size found is logged and written to the metadata."""

    sort_by_length: bool = True
    """Batch prompts of similar length together, longest first, to cut padding; the output order is unaffected."""

    output_order: str = "input"
    """Order of the output rows: "input" (dataset order, skipped rows left out) or "shuffle" (seeded permutation)."""

    seed: int = 0
    """Seed of the "shuffle" output order."""

    dtype: str = "float32"
    """Storage dtype of the activations: float32, float16 or float64."""

    overwrite: bool = False
    """Replace whatever is at output_path (atomically: the old cache stays until the new one is complete)."""

    def __post_init__(self) -> None:
        names = self.hook_names.split(",") if isinstance(self.hook_names, str) else list(self.hook_names)
        self.hook_names = [n.strip() for n in names]
        if not self.hook_names or not all(self.hook_names) or len(set(self.hook_names)) != len(self.hook_names):
            raise ValueError(f"hook_names={names!r} must name at least one hook, each once and none empty.")
        if str(self.dtype) not in STORAGE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} cannot be stored: use float32, float16 or float64.")
        self.dtype = STORAGE_DTYPES[str(self.dtype)]
        check_field_types(self)
        check_minimums(self, {"n_positions": 1, "batch_size": 1, "seed": 0})
        check_output_path(self.output_path, field="output_path")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        self.label_columns = list(self.label_columns)
        if self.prompt_column == self.target_column:
            raise ValueError(f"prompt_column and target_column are both {self.prompt_column!r}: name two columns.")
        outputs = [*RESERVED, *self.hook_names, *self.label_columns]
        clashes = sorted({c for c in outputs if outputs.count(c) > 1})
        if clashes:
            raise ValueError(
                f"output column(s) {clashes} would appear twice: label_columns may not repeat a column, a hook "
                f"name or the reserved {TOKEN_IDS!r}, {POSITIONS!r}, {SOURCE_INDEX!r} (rename the input column)."
            )


def length_order(lengths: np.ndarray, sort_by_length: bool) -> np.ndarray:
    """Order in which rows are batched: longest first (so an out-of-memory shows at once), or as given."""
    return np.argsort(-np.asarray(lengths), kind="stable") if sort_by_length else np.arange(len(lengths))


def padding_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Pad tokens in the right-padded batches of `batch_size` consecutive rows of `order`."""
    lengths = np.asarray(lengths)[order]
    return sum(batch_padding(b) for b in np.split(lengths, range(batch_size, len(lengths), batch_size)))


def batch_padding(lengths) -> int:
    """Pad tokens of one right-padded batch of rows of these lengths."""
    return int(max(lengths) * len(lengths) - sum(lengths))


def batch_activations(model: ModelAdapter, rows: list[LocatedPrompt], hook_names: list[str], pad_token_id: int) -> dict:
    """{hook: acts [rows, n_positions, d]} from one right-padded, masked forward pass; -1 positions give zeros."""
    device = model.device
    length = max(r.forward_length for r in rows)
    tokens_BL = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.forward_length
        tokens_BL[i, :n] = torch.from_numpy(r.token_ids[:n].astype(np.int64))
        mask_BL[i, :n] = 1
    positions_BN = torch.from_numpy(np.stack([r.positions for r in rows])).to(device)
    with model.capture(hook_names) as cap:
        acts = cap(tokens_BL.to(device), attention_mask=mask_BL.to(device))
    rows_B1 = torch.arange(len(rows), device=device)[:, None]
    keep_BN1 = (positions_BN >= 0)[..., None]
    return {h: torch.where(keep_BN1, acts[h][rows_B1, positions_BN.clamp(min=0)], 0) for h in hook_names}


def run_batches(
    model: ModelAdapter,
    located: list[LocatedPrompt],
    order: np.ndarray,
    cfg: TargetedCacheConfig,
    pad_token_id: int,
    sink,
):
    """Feed batches in `order` through the model, calling sink(indices, acts); returns (batch size found, pads)."""
    size, start, pads = cfg.batch_size, 0, 0
    while start < len(order):
        batch = order[start : start + size]
        rows = [located[i] for i in batch]
        try:
            acts = batch_activations(model, rows, cfg.hook_names, pad_token_id)
        except torch.cuda.OutOfMemoryError:
            if not cfg.auto_batch_size or len(batch) == 1:
                raise
            acts = None
        if acts is None:  # handled outside `except`, whose traceback would keep the failed batch's tensors alive
            size = len(batch) // 2
            logger.warning("CUDA out of memory with %d prompts per batch; going on with %d", len(batch), size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        sink(batch, acts)
        pads += batch_padding([r.forward_length for r in rows])
        start += len(batch)
    return size, pads


def cache_targeted(cfg: TargetedCacheConfig, dataset: datasets.Dataset, model, tokenizer=None) -> datasets.Dataset:
    """Cache the activations at each prompt's target tokens; returns the published cache (see the module docstring).

    `model` is any model CacheActivationsRunner takes (`tokenizer`: a transformers model's, as there)."""
    model = adapt(model, tokenizer)
    bos = _check_inputs(cfg, dataset, model)
    paths = RunPaths(Path(cfg.output_path))
    repair_interrupted_swap(paths.out)
    check_output(paths, field="output_path", overwrite=cfg.overwrite, resume=None)
    located, counts = locate_prompts(
        dataset[cfg.prompt_column],
        dataset[cfg.target_column],
        model.tokenizer,
        occurrence=cfg.occurrence,
        n_positions=cfg.n_positions,
        short_span=cfg.short_span,
        bos_token_id=bos,
        n_ctx=model.n_ctx,
    )
    if not located:
        raise ValueError(
            f"no prompt kept out of {len(dataset)} (skipped: {dict(counts)}): check target_column and the prompts."
        )
    hook_dims = model.hook_dims(cfg.hook_names)
    if cfg.output_order == "shuffle":
        located = [located[i] for i in np.random.default_rng(cfg.seed).permutation(len(located))]
    counts.update(input_rows=len(dataset), kept=len(located))
    reset_dir(paths.work)
    try:
        tokenizer = model.tokenizer
        pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        acts, found, pads = _compute(cfg, model, located, hook_dims, paths.work, pad_id)
        metadata = _metadata(cfg, model, hook_dims, counts, found, pads, sum(r.forward_length for r in located))
        logger.info("targeted cache: %s, batch size %d", metadata["counts"], found)
        _publish(cfg, paths, dataset, located, acts, hook_dims, metadata)
        acts.clear()
    finally:
        remove_work(paths)
    return datasets.load_from_disk(cfg.output_path)


def _compute(
    cfg, model: ModelAdapter, rows: list[LocatedPrompt], hook_dims: dict, work: Path, pad_id: int
) -> tuple[dict, int, int]:
    """Every row's activations into memory-mapped (rows, n_positions, d) arrays in `work`, row for row."""
    acts_by_hook = {
        h: np.lib.format.open_memmap(work / f"acts-{i}.npy", "w+", cfg.dtype, (len(rows), cfg.n_positions, d))
        for i, (h, d) in enumerate(hook_dims.items())
    }

    def sink(batch: np.ndarray, acts: dict) -> None:
        for h, a in acts.items():
            acts_by_hook[h][batch] = a.to(getattr(torch, cfg.dtype)).cpu().numpy()

    order = length_order(np.array([r.forward_length for r in rows]), cfg.sort_by_length)
    found, pads = run_batches(model, rows, order, cfg, pad_id, sink)
    return acts_by_hook, found, pads


def _check_inputs(cfg: TargetedCacheConfig, dataset: datasets.Dataset, model: ModelAdapter) -> int | None:
    """Everything checkable before a forward pass; returns the BOS id to put before each prompt (or None)."""
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"dataset is a {type(dataset).__name__}: give a datasets.Dataset (pick a split of a DatasetDict)."
        )
    missing = [c for c in (cfg.prompt_column, cfg.target_column, *cfg.label_columns) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"column(s) {missing} are not in the dataset, which has {dataset.column_names}.")
    for name in (cfg.prompt_column, cfg.target_column):
        if dataset.features[name] not in (datasets.Value("string"), datasets.Value("large_string")):
            raise ValueError(f"column {name!r} holds {dataset.features[name]}, not strings.")
    model.check_hooks(cfg.hook_names)
    if not model.causal:
        raise ValueError("targeted caching needs a causal model: right padding is exact only under causal attention.")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: set model.tokenizer (prompts are tokenized to find the targets).")
    prepend = cfg.prepend_bos if cfg.prepend_bos is not None else model.default_prepend_bos
    if prepend and tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos is on but the tokenizer has no BOS token: set prepend_bos=False.")
    return tokenizer.bos_token_id if prepend else None


def _metadata(cfg, model: ModelAdapter, hook_dims, counts: Counter, found: int, pads: int, tokens: int) -> dict:
    skipped = {k: counts[k] for k in ("not_found", "short_span", "beyond_context")}
    return build_metadata(
        "targeted",
        n_rows=counts["kept"],
        dtype=cfg.dtype,
        hook_dims=hook_dims,
        tokenizer=model.tokenizer,
        config=asdict(cfg),
        n_positions=cfg.n_positions,
        counts={
            "input_rows": counts["input_rows"],
            "kept": counts["kept"],
            "skipped": sum(skipped.values()),
            **skipped,
            "multiple_occurrences": counts["multiple_occurrences"],
        },
        batch_size={"requested": cfg.batch_size, "found": found},
        padding={"forward_tokens": tokens + pads, "pad_tokens": pads},
        model=model.name,
    )


def _publish(cfg, paths: RunPaths, dataset, rows: list[LocatedPrompt], acts: dict, hook_dims, metadata) -> None:
    """Write the rows (already in output order) into a staged cache and publish it."""
    labels = datasets.Features({c: dataset.features[c] for c in cfg.label_columns})
    features = targeted_features(hook_dims, cfg.n_positions, cfg.dtype, labels)
    label_rows = dataset.select_columns(cfg.label_columns).select([r.source_index for r in rows]).with_format("arrow")
    row_bytes = cfg.n_positions * sum(hook_dims.values()) * np.dtype(cfg.dtype).itemsize
    per_file = max(1, FILE_BYTES // row_bytes)
    starts = range(0, len(rows), per_file)
    names = [data_file_name(i, len(starts)) for i in range(len(starts))]
    fingerprint = fingerprint_of(
        {"config": asdict(cfg), "data": getattr(dataset, "_fingerprint", None), "rows": len(rows)}
    )
    with publishing(paths) as staging:
        for name, a in zip(names, starts):
            part = rows[a : a + per_file]
            columns = {
                TOKEN_IDS: [r.token_ids for r in part],
                POSITIONS: np.stack([r.positions for r in part]),
                SOURCE_INDEX: np.array([r.source_index for r in part], dtype=np.int64),
            }
            columns.update({h: acts[h][a : a + per_file] for h in hook_dims})
            table = label_rows[a : a + per_file]
            columns.update({c: table.column(c) for c in cfg.label_columns})
            writer = ArrowFileWriter(staging / name, features)
            writer.write_batch(mixed_record_batch(features, columns))
            writer.close()
        finish_staging(staging, features, names, fingerprint, metadata)
