"""The metadata file of a cache (`sae_cache.json`), which `datasets.load_from_disk` ignores.

Owns what it records (config, resolved plan, per-hook statistics, versions, tokenizer, row count)
and which config fields change the output (used both for the fingerprint and to refuse a resume
whose configuration differs).
"""

from __future__ import annotations

import time
from importlib import metadata as importlib_metadata

from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.plan import CachePlan
from sae_cache.store import HookStats

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
_PACKAGES = ("sae_cache", "torch", "transformer-lens", "datasets", "pyarrow")


def output_fields(cfg: CacheActivationsRunnerConfig) -> dict:
    """The config fields that determine the cache's contents."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_OUTPUT_FIELDS}


def build_metadata(
    cfg: CacheActivationsRunnerConfig, plan: CachePlan, *, stats: dict[str, HookStats], tokenizer, world_size: int = 1
) -> dict:
    """Everything a reader of the cache may want to know about how it was made."""
    return {
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "n_rows": plan.n_rows,
        "n_tokens": plan.n_tokens,
        "context_size": plan.context_size,
        "sliced_context_size": plan.sliced_context_size,
        "dtype": cfg.dtype,
        "shuffled": cfg.shuffle,
        "shuffled_across_sequences": cfg.shuffle_across_sequences,
        "world_size": world_size,
        "hooks": {
            hook: {"d_in": d, "stats": stats[hook].to_dict(d) if hook in stats else None}
            for hook, d in plan.hook_dims.items()
        },
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "config": cfg.to_dict(),
        "plan": plan.to_dict(),
        "versions": {name: _version(name) for name in _PACKAGES},
    }


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None
