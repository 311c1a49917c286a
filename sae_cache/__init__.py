"""sae_cache: cache a language model's activations to disk for SAE training with SAELens.

    from sae_cache import CacheActivationsRunnerConfig, CacheActivationsRunner
    CacheActivationsRunner(CacheActivationsRunnerConfig(...)).run()

The pipeline, one module per stage: config -> plan -> data/tokenization -> model -> store ->
arrow_format (writer) -> consolidate/shuffle -> runner -> cli. `reader` iterates a cache for training.
"""

from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.reader import CachedActivations
from sae_cache.runner import CacheActivationsRunner
from sae_cache.store import ActivationsStore

__all__ = ["ActivationsStore", "CacheActivationsRunner", "CacheActivationsRunnerConfig", "CachedActivations"]
__version__ = "0.1.0"
