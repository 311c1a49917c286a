"""The untimed setup every measured run shares: the one model builder, the token data, the sae_cache config, and
synthetic caches for the benchmarks that run no model.

- `build_model(kind, device)`: the demo model ("demo", 4 layers, d_model 256), or a random HookedTransformer of
  the same shape ("random", the same weights in every process and on every rank);
- `tokens` (a task, run once by `_common.prepare_tokens`): a pretokenized datasets directory of rows of
  `context` tokens, the demo text tiled (random ids where the demo assets are unavailable), read back by
  `load_rows`;
- `cache_config(...)`: sae_cache's config for these runs; `cache_info(...)`: what a finished cache holds;
- `synthetic_columns` and the `make_shards` task: Arrow shards (or a whole cache) of random activations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmark._common import D_MODEL, HOOK, MiB, entry
from benchmark._measure import Timed

VOCAB = 4096


def build_model(kind: str, device: str = "cpu"):
    """The demo model, or (kind "random") a random HookedTransformer of its shape, in eval mode on `device`."""
    import torch

    if kind == "demo":
        from sae_cache.demo import load_demo_model

        return load_demo_model(device=device)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=4,
        d_model=D_MODEL,
        n_heads=4,
        d_head=64,
        d_mlp=1024,
        n_ctx=256,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device=device,
    )
    return HookedTransformer(cfg).eval()


def stop_layer(hooks: str | list[str]) -> int:
    """The layer after the deepest hook: where a forward pass that records them can stop."""
    names = [hooks] if isinstance(hooks, str) else hooks
    return max(int(h.split(".")[1]) for h in names) + 1


def warm_up(model, batch: int, context: int, hook: str | list[str] = HOOK, device: str = "cpu") -> None:
    """One untimed forward pass of a full batch: torch's first-call costs, and the pass's working memory in VmHWM.

    The RSS budget's "model" term is the peak RSS after this pass (weights + one forward pass's activations).
    """
    import torch

    with torch.no_grad():
        model(torch.zeros((batch, context), dtype=torch.long, device=device), stop_at_layer=stop_layer(hook))


def load_rows(data: str):
    """The pretokenized rows written by the `tokens` task."""
    from datasets import load_from_disk

    return load_from_disk(data)


def model_and_rows(kind: str, data: str, batch: int, context: int, hook: str | list[str], device: str):
    """The model, built and warmed up with one batch, and the pretokenized rows: the setup of an end-to-end run."""
    model = build_model(kind, device)
    rows = load_rows(data)
    warm_up(model, batch, context, hook, device)
    return model, rows


def _demo_rows(context: int):
    """The demo text, tokenized and packed into rows of `context` tokens (numpy, one row per row)."""
    import numpy as np
    import torch

    from sae_cache.demo import load_demo_dataset
    from sae_cache.tokenization import pack_sequences

    tokenizer = build_model("demo").tokenizer
    ids = tokenizer(list(load_demo_dataset()["text"]), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    rows = pack_sequences(
        (np.asarray(i) for i in ids),
        context_size=context,
        bos_token_id=bos,
        separator_token_id=bos,
        disable_concat=False,
    )
    return torch.stack(list(rows)).numpy()


def task_tokens(out: str, n_rows: int, context: int) -> dict:
    """Write a pretokenized dataset (`input_ids`, rows of `context`) of n_rows rows: the demo text, tiled."""
    import numpy as np
    from datasets import Dataset

    try:
        base = _demo_rows(context)
        kind, source = "demo", f"demo text ({len(base):,} rows of {context} tokens, tiled)"
    except Exception as e:  # noqa: BLE001 - the demo assets are optional here
        print(f"demo model unavailable ({e!r}): using a random model and random tokens", file=sys.stderr)
        base = np.random.default_rng(0).integers(4, VOCAB, size=(4096, context))
        kind, source = "random", "random token ids"
    reps = -(-n_rows // len(base))
    arr = np.tile(base, (reps, 1))[:n_rows].astype(np.int32)
    with Timed() as t:
        Dataset.from_dict({"input_ids": arr.tolist()}).save_to_disk(out)
    return t.result(kind=kind, source=source, n_rows=n_rows, path=out)


def cache_config(
    out: str,
    *,
    hooks: str | list[str],
    training_tokens: int,
    batch: int,
    context: int,
    buffer_size_gb: float,
    device: str,
    shuffle: bool = False,
    **fields,
):
    """sae_cache's config for a benchmark run (a model and a dataset are passed to the runner)."""
    from sae_cache import CacheActivationsRunnerConfig

    return CacheActivationsRunnerConfig(
        model_name="bench-model",
        hook_name=hooks,
        training_tokens=training_tokens,
        context_size=context,
        model_batch_size=batch,
        new_cached_activations_path=out,
        shuffle=shuffle,
        device=device,
        buffer_size_gb=buffer_size_gb,
        overwrite=True,
        **fields,
    )


def cache_info(out: Path, n_rows: int, context: int, n_hooks: int = 1) -> dict:
    """Tokens, bytes on disk, bytes of data files, data files, and raw float32 activation bytes of a cache."""
    files = sorted(out.rglob("*.arrow"))
    return {
        "tokens": n_rows * context,
        "disk_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "data_bytes": sum(p.stat().st_size for p in files),
        "n_files": len(files),
        "raw_act_bytes": n_rows * context * D_MODEL * 4 * n_hooks,
    }


# -- synthetic caches (no model) ---------------------------------------------------------------------


def synthetic_columns(rows: int, context: int, seed: int = 0) -> dict:
    """Random float32 activations (rows, context, D_MODEL) of HOOK and int32 token ids, as numpy columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((rows, context, D_MODEL), dtype=np.float32)
    token_ids = rng.integers(0, VOCAB, size=(rows, context), dtype=np.int32)
    return {HOOK: acts, "token_ids": token_ids}


def rows_in(mib: int, context: int) -> int:
    """Rows of `context` float32 activations of width D_MODEL in `mib` MiB."""
    return mib * MiB // (context * D_MODEL * 4)


def task_make_shards(directory: str, shard_mib: int, n_shards: int, context: int, as_cache: bool) -> dict:
    """n_shards Arrow files of shard_mib MiB of activations each (shards, or a cache with state.json)."""
    import numpy as np

    from sae_cache.arrow_format import ArrowFileWriter, cache_features, data_file_name, write_dataset_files

    rows = rows_in(shard_mib, context)
    columns = synthetic_columns(rows, context)
    features = cache_features({HOOK: D_MODEL}, context, "float32")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = [data_file_name(i, n_shards) if as_cache else f"shard_{i:05d}.arrow" for i in range(n_shards)]
    with Timed() as t:
        for i, name in enumerate(names):
            columns["token_ids"] = np.arange(i * rows * context, (i + 1) * rows * context, dtype=np.int32).reshape(
                rows, context
            )
            writer = ArrowFileWriter(out / name, features)
            writer.write(columns)
            writer.close()
        if as_cache:
            write_dataset_files(out, features, names, fingerprint="benchmark")
    return t.result(
        files=[str(out / n) for n in names],
        rows_per_file=rows,
        n_rows=rows * n_shards,
        bytes=sum((out / n).stat().st_size for n in names),
    )


TASKS = {"tokens": task_tokens, "make_shards": task_make_shards}

if __name__ == "__main__":
    entry(lambda argv: None, TASKS)
