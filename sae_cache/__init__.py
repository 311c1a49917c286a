"""sae_cache: cache a language model's activations to disk for SAE training with SAELens.

    from sae_cache import CacheActivationsRunnerConfig, CacheActivationsRunner
    CacheActivationsRunner(CacheActivationsRunnerConfig(...)).run()

The pipeline, one module per stage: config -> plan -> data/tokenization -> model -> store (compute) ->
writer (shards) -> shuffle -> publish -> runner -> cli. `reader` iterates a cache for training.
The heavy modules (TransformerLens, datasets) load on first use, so the CLI answers --help at once.
"""

from importlib import import_module

from sae_cache.config import CacheActivationsRunnerConfig

__all__ = [
    "ActivationsStore",
    "CacheActivationsRunner",
    "CacheActivationsRunnerConfig",
    "CachedActivations",
    "TargetedCacheConfig",
    "cache_targeted",
]
__version__ = "0.1.0"

_LAZY = {
    "ActivationsStore": "sae_cache.store",
    "CacheActivationsRunner": "sae_cache.runner",
    "CachedActivations": "sae_cache.reader",
    "TargetedCacheConfig": "sae_cache.targeted",
    "cache_targeted": "sae_cache.targeted",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_cache' has no attribute {name!r}")
