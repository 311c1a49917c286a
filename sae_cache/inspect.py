"""`python -m sae_cache info DIR`: describe and check a finished cache.

Owns the human-readable description of a cache on disk: hooks, shape, rows, bytes, per-hook
statistics, and a check that `datasets.load_from_disk` opens it with the row count the metadata claims.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets

from sae_cache.arrow_format import METADATA_FILE, TOKEN_IDS, read_json


def describe(path: Path) -> str:
    """A summary of the cache at `path`; raises ValueError when it is not a complete, consistent cache."""
    if not (path / METADATA_FILE).is_file():
        raise ValueError(f"{path} is not a complete sae_cache cache (no {METADATA_FILE}).")
    meta = read_json(path / METADATA_FILE)
    dataset = datasets.load_from_disk(str(path))
    if meta.get("kind") == "targeted":
        return _describe_targeted(path, meta, dataset)
    if len(dataset) != meta["n_rows"]:
        raise ValueError(f"{path}: the metadata says {meta['n_rows']} rows but the data files hold {len(dataset)}.")
    size = sum(f.stat().st_size for f in path.glob("*.arrow"))
    lines = [
        f"{path}: {meta['n_rows']:,} rows x {meta['sliced_context_size']} tokens ({meta['n_tokens']:,} tokens), "
        f"{meta['dtype']}, {size / 1e9:.3f} GB in {len(list(path.glob('*.arrow')))} files",
        f"  shuffled: {meta['shuffled']}, across sequences: {meta['shuffled_across_sequences']}",
        f"  model: {meta['config']['model_name']}, dataset: {meta['config']['dataset_path']}",
    ]
    for hook, info in meta["hooks"].items():
        stats = info.get("stats") or {}
        lines.append(
            f"  {hook}: d_in={info['d_in']}, mean norm {stats.get('mean_norm', float('nan')):.4g}, "
            f"max |x| {stats.get('max_abs', float('nan')):.4g}, inf after cast {stats.get('inf_after_cast', 0)}"
        )
    lines.append(f"  columns: {[c for c in dataset.column_names if c != TOKEN_IDS]} + {TOKEN_IDS}")
    return "\n".join(lines)


def _describe_targeted(path: Path, meta: dict, dataset) -> str:
    counts = meta.get("counts", {})
    hooks = ", ".join(f"{hook} (d_in={info['d_in']})" for hook, info in meta.get("hooks", {}).items())
    return "\n".join(
        [
            f"{path}: position-targeted cache, {len(dataset):,} rows (kept {counts.get('kept')}, skipped {counts.get('skipped')})",
            f"  hooks: {hooks}",
            f"  columns: {dataset.column_names}",
        ]
    )


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
