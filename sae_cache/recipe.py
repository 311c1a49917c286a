"""The SAELens script that trains an SAE from a finished cache, as printed after a run (`python -m sae_cache`).

Owns `saelens_recipe`: a complete Python script, runnable as printed, that trains a standard SAE on one hook
of the cache with `use_cached_activations=True`. Its fields agree with the cache (hook, sliced row length,
d_in), its buffer sizes with SAELens's rules (docs/saelens.md, section 7: the mixing buffer holds at least one
training batch, and training stops before a second pass over the cache), and where SAELens cannot load the
model or the data by name (the bundled demo, a `save_to_disk` directory) it passes them as overrides.
"""

from __future__ import annotations

from pathlib import Path

from sae_cache.config import COMPACT_DTYPES
from sae_cache.demo import DEMO_DATASET_NAME, DEMO_MODEL_NAME

EXPANSION = 8  # d_sae = EXPANSION * d_in
MAX_BATCH_TOKENS = 4096  # SAELens's default train_batch_size_tokens
STORE_ROWS = 32  # SAELens's default store_batch_size_prompts


def saelens_recipe(
    *,
    cache: Path,
    hook: str,
    d_in: int,
    context_size: int,
    n_rows: int,
    model_name: str,
    dataset_path: str,
    device: str,
    model_class_name: str = "HookedTransformer",
    dtype: str = "float32",
) -> str:
    """The script (see the module docstring); context_size is the cache's stored (sliced) row length."""
    batch, buffers, store_rows, tokens = training_sizes(n_rows, context_size)
    imports, overrides, runner = _imports_and_overrides(model_name, dataset_path, dtype)
    model_class = [] if model_class_name == "HookedTransformer" else [f"    model_class_name={model_class_name!r},"]
    return "\n".join(
        [
            *imports,
            "",
            "cfg = LanguageModelSAERunnerConfig(",
            f"    sae=StandardTrainingSAEConfig(d_in={d_in}, d_sae={EXPANSION * d_in}),",
            f"    model_name={model_name!r},",
            *model_class,
            f"    hook_name={hook!r},",
            f"    dataset_path={dataset_path!r},  # SAELens opens it (or override_dataset); it trains from the cache",
            f"    context_size={context_size},  # the cache's (sliced) row length",
            "    use_cached_activations=True,",
            f"    cached_activations_path={str(cache)!r},",
            f"    training_tokens={tokens},  # at most the cache's tokens less one mixing buffer",
            f"    train_batch_size_tokens={batch},",
            f"    store_batch_size_prompts={store_rows},",
            f"    n_batches_in_buffer={buffers},  # mixing buffer of {buffers * context_size} tokens >= one batch",
            f"    device={device!r},",
            "    logger=LoggingConfig(log_to_wandb=False),  # True to log to Weights & Biases",
            "    n_checkpoints=0,",
            f"    output_path={str(cache) + '-sae'!r},",
            ")",
            f"sae = {runner}({', '.join(['cfg', *overrides])}).run()",
        ]
    )


def _imports_and_overrides(model_name: str, dataset_path: str, dtype: str) -> tuple[list[str], list[str], str]:
    """The script's imports, the runner's overrides (what SAELens cannot load by name) and the runner to call."""
    imports = [
        "from sae_lens import (",
        "    LanguageModelSAERunnerConfig,",
        "    LanguageModelSAETrainingRunner,",
        "    LoggingConfig,",
        "    StandardTrainingSAEConfig,",
        ")",
    ]
    overrides, demo = [], []
    if model_name == DEMO_MODEL_NAME:  # SAELens cannot load the demo model by its name
        overrides.append("override_model=load_demo_model()")
        demo.append("load_demo_model")
    if dataset_path == DEMO_DATASET_NAME:  # nor open the demo text
        overrides.append("override_dataset=load_demo_dataset()")
        demo.insert(0, "load_demo_dataset")
    elif (Path(dataset_path) / "state.json").is_file():  # nor a save_to_disk directory
        imports.insert(0, "import datasets")
        overrides.append(f"override_dataset=datasets.load_from_disk({dataset_path!r})")
    if demo:
        imports.append(f"from sae_cache.demo import {', '.join(demo)}")
    if dtype in COMPACT_DTYPES:  # SAELens reads a compact cache through the adapter (docs/saelens.md)
        imports.append("from sae_cache.saelens import training_runner")
        return imports, overrides, "training_runner"
    return imports, overrides, "LanguageModelSAETrainingRunner"


def training_sizes(n_rows: int, context_size: int) -> tuple[int, int, int, int]:
    """(train_batch_size_tokens, n_batches_in_buffer, store_batch_size_prompts, training_tokens) for a cache of
    n_rows rows: at least about 16 training batches, a mixing buffer of at least two batches, and training that
    ends before SAELens starts a second pass over the cache."""
    n_tokens = n_rows * context_size
    batch = 1 << max(0, min(MAX_BATCH_TOKENS, n_tokens // 16).bit_length() - 1)  # a power of two
    buffers = max(2, -(-2 * batch // context_size))
    store_rows = max(1, min(STORE_ROWS, n_rows // 4))
    read_rows = n_rows - n_rows % store_rows
    tokens = max(batch, (read_rows - buffers) * context_size // batch * batch)
    return batch, buffers, store_rows, tokens
