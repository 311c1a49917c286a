"""Pushing a finished cache to the Hugging Face Hub (the only module that talks to the network).

Owns `push_cache`: the cache is exported as Parquet shards under `data/` (the layout the Hub's
dataset viewer and `load_dataset(repo_id)` read; `hf_num_shards` of them, or about 500 MB each) into the
run's work directory, uploaded with one commit to `hf_revision`, followed by the run's
configuration as `cache_activations_runner_cfg.json`, as SAELens does. `api` can be injected (tests
pass a fake object; the Hub cannot be reached there).
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import datasets
from huggingface_hub import HfApi

from sae_cache.publish import reset_dir

CONFIG_FILE_IN_REPO = "cache_activations_runner_cfg.json"
DEFAULT_SHARD_BYTES = 500_000_000


def push_cache(
    cache_dir: Path,
    *,
    repo_id: str,
    export_dir: Path,
    config: dict,
    num_shards: int | None = None,
    revision: str = "main",
    private: bool = False,
    api: HfApi | None = None,
) -> list[str]:
    """Push the cache at `cache_dir` and its `config` (as JSON) to the Hub dataset `repo_id`, exporting the
    Parquet files into `export_dir` (removed afterwards); returns the uploaded data files."""
    if not repo_id:
        raise ValueError("hf_repo_id is not set: name the Hub dataset repository to push to.")
    api = api if api is not None else HfApi()
    dataset = datasets.load_from_disk(str(cache_dir))
    reset_dir(export_dir / "data")
    try:
        files = _export_parquet(dataset, export_dir / "data", num_shards)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        api.upload_folder(
            folder_path=str(export_dir),
            repo_id=repo_id,
            repo_type="dataset",
            revision=revision,
            commit_message="Add cached activations (sae_cache)",
        )
        api.upload_file(
            path_or_fileobj=io.BytesIO(json.dumps(config, indent=2, default=str).encode()),
            path_in_repo=CONFIG_FILE_IN_REPO,
            repo_id=repo_id,
            repo_type="dataset",
            revision=revision,
            commit_message="Add cache_activations_runner config",
        )
    finally:
        shutil.rmtree(export_dir)
    return files


def _export_parquet(dataset: datasets.Dataset, data_dir: Path, num_shards: int | None) -> list[str]:
    if num_shards is None:
        num_shards = max(1, math.ceil(dataset.data.nbytes / DEFAULT_SHARD_BYTES))
    num_shards = min(num_shards, len(dataset))
    files = []
    for i in range(num_shards):
        name = f"train-{i:05d}-of-{num_shards:05d}.parquet"
        dataset.shard(num_shards, index=i, contiguous=True).to_parquet(str(data_dir / name))
        files.append(f"data/{name}")
    return files
