"""Pushing a finished cache to the Hugging Face Hub (the only module that talks to the network).

Owns `push_cache`: the cache is exported as Parquet shards under `data/` (the layout the Hub's
dataset viewer and `load_dataset(repo_id)` read; `hf_num_shards` of them, or about 500 MB each) in the
run's temporary directory, uploaded with one commit to `hf_revision`, followed by the run's
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

from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.consolidate import RunPaths, reset_dir

CONFIG_FILE_IN_REPO = "cache_activations_runner_cfg.json"
DEFAULT_SHARD_BYTES = 500_000_000


def push_cache(cache_dir: Path, cfg: CacheActivationsRunnerConfig, api: HfApi | None = None) -> list[str]:
    """Push the cache at `cache_dir` and its config JSON to cfg.hf_repo_id; returns the uploaded data files."""
    if not cfg.hf_repo_id:
        raise ValueError("hf_repo_id is not set: name the Hub dataset repository to push to.")
    api = api if api is not None else HfApi()
    dataset = datasets.load_from_disk(str(cache_dir))
    export = RunPaths(Path(cache_dir)).work / "hub"
    reset_dir(export / "data")
    try:
        files = _export_parquet(dataset, export / "data", cfg.hf_num_shards)
        api.create_repo(cfg.hf_repo_id, repo_type="dataset", private=cfg.hf_is_private_repo, exist_ok=True)
        if cfg.hf_revision != "main":
            api.create_branch(cfg.hf_repo_id, branch=cfg.hf_revision, repo_type="dataset", exist_ok=True)
        api.upload_folder(
            folder_path=str(export),
            repo_id=cfg.hf_repo_id,
            repo_type="dataset",
            revision=cfg.hf_revision,
            commit_message="Add cached activations (sae_cache)",
        )
        api.upload_file(
            path_or_fileobj=io.BytesIO(json.dumps(cfg.to_dict(), indent=2, default=str).encode()),
            path_in_repo=CONFIG_FILE_IN_REPO,
            repo_id=cfg.hf_repo_id,
            repo_type="dataset",
            revision=cfg.hf_revision,
            commit_message="Add cache_activations_runner config",
        )
    finally:
        shutil.rmtree(export.parent)
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
