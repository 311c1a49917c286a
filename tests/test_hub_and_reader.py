"""Pushing to the Hub through an injected fake API, and the zero-copy reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae_cache import CacheActivationsRunner, CachedActivations
from sae_cache.hub import CONFIG_FILE_IN_REPO, push_cache
from sae_cache.publish import RunPaths

HOOK = "blocks.1.hook_resid_post"


class FakeApi:
    """Records what would be sent to the Hub and checks the files while they exist."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, folder_path, **kwargs):
        files = sorted(
            p.relative_to(folder_path).as_posix() for p in __import__("pathlib").Path(folder_path).rglob("*.parquet")
        )
        rows = sum(pq.read_metadata(f"{folder_path}/{f}").num_rows for f in files)
        self.calls.append(("upload_folder", files, rows, kwargs))

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kwargs):
        self.calls.append(("upload_file", path_in_repo, json.loads(path_or_fileobj.read()), kwargs))


@pytest.fixture
def finished(model, text_dataset, make_cfg):
    cfg = make_cfg(shuffle=True, hf_repo_id="me/acts", hf_num_shards=3, hf_revision="v1", hf_is_private_repo=True)
    runner = CacheActivationsRunner(make_cfg(shuffle=True), override_dataset=text_dataset, model=model)
    runner.run()
    return cfg, runner.paths.out


def test_push_sends_shards_and_config(finished):
    cfg, out = finished
    api = FakeApi()
    files = push_cache(
        out,
        repo_id=cfg.hf_repo_id,
        export_dir=RunPaths(out).hub,
        config=cfg.to_dict(),
        num_shards=cfg.hf_num_shards,
        revision=cfg.hf_revision,
        private=cfg.hf_is_private_repo,
        api=api,
    )
    assert files == [f"data/train-{i:05d}-of-00003.parquet" for i in range(3)]
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["repo_type"] == "dataset"
    assert api.calls[2][2] == 40 and api.calls[2][3]["revision"] == "v1"
    assert api.calls[3][1] == CONFIG_FILE_IN_REPO and api.calls[3][2]["hf_repo_id"] == "me/acts"
    assert not RunPaths(out).hub.exists()  # the export is removed afterwards


def test_runner_pushes_when_hf_repo_id_is_set(model, text_dataset, make_cfg, monkeypatch):
    pushed = []
    monkeypatch.setattr("sae_cache.hub.push_cache", lambda out, **kwargs: pushed.append((out, kwargs["repo_id"])))
    CacheActivationsRunner(make_cfg(hf_repo_id="me/acts"), override_dataset=text_dataset, model=model).run()
    assert pushed and pushed[0][1] == "me/acts"


def test_reader_file_order_is_zero_copy_and_complete(finished):
    _, out = finished
    reader = CachedActivations(out)
    assert (len(reader), reader.sliced_context_size, reader.d_in(), reader.hook_names) == (40, 16, 32, [HOOK])
    batches = list(reader.batches(64))
    acts = torch.cat([a for a, _ in batches])
    tokens = torch.cat([t for _, t in batches])
    stored = __import__("datasets").load_from_disk(str(out)).with_format("torch")[:]
    assert torch.equal(acts, stored[HOOK].reshape(-1, 32)) and torch.equal(tokens, stored["token_ids"].reshape(-1))
    first, _ = batches[0]
    assert not first.numpy().flags.owndata  # a view of the memory map, not a copy


def test_reader_shuffled_is_a_seeded_permutation(finished):
    _, out = finished
    reader = CachedActivations(out)
    a = torch.cat([x for x, _ in reader.batches(64, shuffle=True, seed=1)])
    b = torch.cat([x for x, _ in reader.batches(64, shuffle=True, seed=1)])
    c = torch.cat([x for x, _ in reader.batches(64, shuffle=True, seed=2)])
    plain = torch.cat([x for x, _ in reader.batches(64)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    key = lambda t: sorted(map(bytes, t.numpy()))  # noqa: E731
    assert key(a) == key(plain)


def test_reader_errors(finished, tmp_path):
    _, out = finished
    with pytest.raises(ValueError, match="not in this cache"):
        next(CachedActivations(out).batches(8, hook="blocks.0.hook_resid_post"))
    with pytest.raises(FileNotFoundError, match="not a cache directory"):
        CachedActivations(tmp_path)
    assert len(list(CachedActivations(out).batches(600, drop_last=False))) == 2
    assert np.prod(next(CachedActivations(out).batches(600))[0].shape) == 600 * 32
