"""`python -m sae_cache info DIR`: describe and check a finished cache of any kind.

Owns the human-readable description of a cache on disk, read from its metadata file (the fields every
kind records, its storage format with the bytes per token and where its quality is measured, then the details
its kind records) and checked against its data: `datasets.load_from_disk` must open it with the row count the
metadata claims.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets

from sae_cache.files import read_json
from sae_cache.metadata import METADATA_FILE
from sae_cache.storage_formats import QUALITY_NOTE, storage_format


def describe(path: Path) -> str:
    """A summary of the cache at `path`; raises ValueError when it is not a complete, consistent cache."""
    if not path.exists():
        raise ValueError(f"{path} does not exist: give the directory of a cache (its new_cached_activations_path).")
    if not path.is_dir():
        raise ValueError(f"{path} is a file: give the directory of a cache (its new_cached_activations_path).")
    if not (path / METADATA_FILE).is_file():
        raise ValueError(f"{path} is not a complete sae_cache cache (no {METADATA_FILE}).")
    meta = read_json(path / METADATA_FILE)
    dataset = datasets.load_from_disk(str(path))
    if len(dataset) != meta["n_rows"]:
        raise ValueError(f"{path}: the metadata says {meta['n_rows']} rows but the data files hold {len(dataset)}.")
    files = sorted(path.glob("*.arrow"))
    size = sum(f.stat().st_size for f in files)
    lines = [
        f"{path}: {_what(meta)}, {meta['dtype']}, {size / 1e9:.3f} GB in {len(files)} files",
        *_storage(meta),
        *_details(meta),
        f"  model: {meta['config'].get('model_name', meta.get('model'))}, tokenizer: {meta.get('tokenizer')}",
    ]
    for hook, info in meta["hooks"].items():
        stats = info.get("stats") or {}
        line = f"  {hook}: d_in={info['d_in']}"
        if stats:
            line += (
                f", mean norm {stats['mean_norm']:.4g}, max |x| {stats['max_abs']:.4g}, "
                f"inf after cast {stats['inf_after_cast']}"
            )
        lines.append(line)
    lines.append(f"  columns: {dataset.column_names}")
    return "\n".join(lines)


def _what(meta: dict) -> str:
    """What the rows are: token rows of a fixed length, or one row per prompt of a targeted cache."""
    if "counts" in meta:
        counts = meta["counts"]
        return f"position-targeted cache, {meta['n_rows']:,} rows (kept {counts['kept']}, skipped {counts['skipped']})"
    if "sliced_context_size" in meta:
        return f"{meta['n_rows']:,} rows x {meta['sliced_context_size']} tokens ({meta['n_tokens']:,} tokens)"
    return f"{meta['n_rows']:,} rows"


def _storage(meta: dict) -> list[str]:
    """The lines on the storage format: what it stores, bytes per token against float32's, how to read it, its cost."""
    fmt = storage_format(meta["dtype"])
    storage = meta.get("storage")
    lines = [f"  storage: {fmt.name}, {fmt.description}"]
    if storage:
        ratio = storage["bytes_per_token"] / storage["float32_bytes_per_token"]
        lines.append(
            f"  bytes per token: {storage['bytes_per_token']:.1f} (float32: {storage['float32_bytes_per_token']:.1f}, "
            f"ratio {ratio:.3f})"
        )
    if not fmt.plain:
        lines.append("  read with: sae_cache.CachedActivations, or sae_cache.saelens.training_runner(cfg) for SAELens")
    lines.append(f"  quality of each format: {storage['quality'] if storage else QUALITY_NOTE}")
    return lines


def _details(meta: dict) -> list[str]:
    """The lines of what a kind records beyond the common fields."""
    lines = []
    if "shuffled" in meta:
        lines.append(f"  shuffled: {meta['shuffled']}, across sequences: {meta['shuffled_across_sequences']}")
    if "n_positions" in meta:
        lines.append(f"  positions per prompt: {meta['n_positions']}, from {meta['counts']['input_rows']:,} prompts")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sae_cache info CACHE_DIR", file=sys.stderr)
        return 2
    try:
        print(describe(Path(argv[0])))
    except (ValueError, OSError) as e:
        print(f"sae_cache: error: {e}", file=sys.stderr)
        return 2
    return 0
