"""The metadata file of a cache (`sae_cache.json`), which `datasets.load_from_disk` ignores.

Owns what it records for every kind of cache (kind, rows, storage dtype, hooks with their widths, columns and
statistics, tokenizer, config, versions, plus the kind's own details: a cache of token rows records its storage
format's bytes per token and where its quality is measured), which config fields change the
output, and the run's identity built from them: the fingerprint datasets keys on, and what a resume
must reproduce.
"""

from __future__ import annotations

import json
import time
from importlib import metadata as importlib_metadata

from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.plan import CachePlan, row_bytes
from sae_cache.stats import HookStats
from sae_cache.storage_formats import QUALITY_NOTE, storage_format

METADATA_FILE = "sae_cache.json"
FORMAT_VERSION = 1
# Fields that do not change a single byte of the cache.
NON_OUTPUT_FIELDS = frozenset(
    {
        "device",
        "forward_threads",
        "overwrite",
        "resume",
        "hf_repo_id",
        "hf_num_shards",
        "hf_revision",
        "hf_is_private_repo",
        "compile_llm",
        "llm_compilation_mode",
        "streaming",
        "dataset_trust_remote_code",
        "fp16_overflow",
        "direct_io",
        "new_cached_activations_path",
    }
)
_PACKAGES = ("sae_cache", "torch", "transformer-lens", "transformers", "datasets", "pyarrow")


def output_fields(cfg: CacheActivationsRunnerConfig) -> dict:
    """The config fields that determine the cache's contents, as JSON values."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in NON_OUTPUT_FIELDS}
    return json.loads(json.dumps(fields, default=str))


def run_identity(cfg: CacheActivationsRunnerConfig, plan: CachePlan) -> dict:
    """What a run produces: its output fields and resolved plan (a resume must match both)."""
    return json.loads(json.dumps({"fields": output_fields(cfg), "plan": plan.to_dict()}, default=str))


def build_metadata(
    kind: str,
    *,
    n_rows: int,
    dtype: str,
    hook_dims: dict[str, int],
    tokenizer,
    config: dict,
    stats: dict[str, HookStats] | None = None,
    **details,
) -> dict:
    """Everything a reader of a cache may want to know about how it was made; `details` are the kind's own."""
    stats = stats or {}
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created_unix": int(time.time()),
        "n_rows": n_rows,
        "dtype": dtype,
        "hooks": {
            hook: {
                "d_in": d,
                "columns": list(storage_format(dtype).columns(hook, d)),
                "stats": stats[hook].to_dict(d) if hook in stats else None,
            }
            for hook, d in hook_dims.items()
        },
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "config": config,
        "versions": {name: _version(name) for name in _PACKAGES},
        **details,
    }


def activations_metadata(
    cfg: CacheActivationsRunnerConfig, plan: CachePlan, *, stats: dict[str, HookStats], tokenizer, world_size: int = 1
) -> dict:
    """The metadata of a cache of token rows (what CacheActivationsRunner writes)."""
    return build_metadata(
        "activations",
        n_rows=plan.n_rows,
        dtype=cfg.dtype,
        hook_dims=plan.hook_dims,
        tokenizer=tokenizer,
        config=cfg.to_dict(),
        stats=stats,
        **{size: getattr(plan, size) for size in ("n_tokens", "context_size", "sliced_context_size")},
        shuffled=cfg.shuffle,
        shuffled_across_sequences=cfg.shuffle_across_sequences,
        world_size=world_size,
        storage=storage_summary(plan.hook_dims, plan.sliced_context_size, cfg.dtype),
        plan=plan.to_dict(),
    )


def storage_summary(hook_dims: dict[str, int], sliced_context_size: int, dtype: str) -> dict:
    """The storage format of a cache of token rows: what it stores, its bytes per token on disk beside float32's,
    and where its cost to SAE quality is measured."""
    per_token = row_bytes(hook_dims, sliced_context_size, dtype)[1] / sliced_context_size
    float32 = row_bytes(hook_dims, sliced_context_size, "float32")[1] / sliced_context_size
    return {
        "format": dtype,
        "description": storage_format(dtype).description,
        "bytes_per_token": per_token,
        "float32_bytes_per_token": float32,
        "quality": QUALITY_NOTE,
    }


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None
