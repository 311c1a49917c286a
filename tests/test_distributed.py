"""Several processes (gloo on CPU) cache one dataset together: same rows as one process, reproducible shuffle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from sae_cache import CacheActivationsRunner, distributed
from sae_cache.distributed import Ranks, batches_of_rank, rows_of_rank

HOOK = "blocks.1.hook_resid_post"
WORKER = r"""
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from datasets import Dataset
from conftest import build_model, build_tokenizer, data_passes, make_texts
from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

torch.set_num_threads(1)
rank, world, init, options = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
kill_rank, kill_at = options.pop("kill_rank", None), options.pop("kill_at_forward", None)
model, data = build_model(build_tokenizer()), Dataset.from_dict({{"text": make_texts(400)}})


def kill_at_pass(n):
    if rank == kill_rank and n == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


with data_passes(model, kill_at_pass):
    ds = CacheActivationsRunner(CacheActivationsRunnerConfig(**options), override_dataset=data, model=model).run()
print(json.dumps({{"rank": rank, "rows": len(ds)}}))
dist.destroy_process_group()
"""


def options(out: Path, **overrides) -> dict:
    fields = dict(
        dataset_path="x",
        model_name="tiny",
        model_batch_size=5,
        hook_name=HOOK,
        d_in=32,
        training_tokens=16 * 83,  # 83 rows: 17 batches, the last one partial
        context_size=16,
        new_cached_activations_path=str(out),
        shuffle=False,
        device="cpu",
        buffer_size_gb=10 * (16 * 32 * 4 + 16 * 4 + 17 * 4) * 1.001 / 1e9,
    )
    return {**fields, **overrides}


def run_ranks(world: int, opts: dict, tmp_path: Path, *, expect_ok: bool = True) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    init = f"file://{tmp_path}/init-{os.urandom(4).hex()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), init, json.dumps(opts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if expect_ok:
        for r in results:
            assert r.returncode == 0, r.stderr[-3000:]
    return results


def rows_of(path) -> tuple[torch.Tensor, torch.Tensor]:
    ds = datasets.load_from_disk(str(path)).with_format("torch")[:]
    return ds[HOOK], ds["token_ids"]


def row_keys(acts, tokens) -> list[bytes]:
    return sorted(a.numpy().tobytes() + t.numpy().tobytes() for a, t in zip(acts, tokens))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference cache, unshuffled."""
    from conftest import build_model, build_tokenizer, make_texts

    from sae_cache import CacheActivationsRunnerConfig

    model = build_model(build_tokenizer())
    base = tmp_path_factory.mktemp("single")
    data = datasets.Dataset.from_dict({"text": make_texts(400)})
    plain = CacheActivationsRunner(
        CacheActivationsRunnerConfig(**options(base / "plain")), override_dataset=data, model=model
    ).run()
    return {"plain": base / "plain", "n": len(plain)}


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> Path:
    """A shuffled cache made by two ranks: the reference of the reproducibility and the resume tests."""
    base = tmp_path_factory.mktemp("shuffled")
    run_ranks(2, options(base / "cache", shuffle=True, seed=5), base)
    return base / "cache"


def test_rank_shares_partition_the_rows():
    for n_rows, batch, world in [(43, 5, 2), (43, 5, 3), (83, 5, 2), (10, 5, 3), (7, 10, 2)]:
        shares = [rows_of_rank(n_rows, batch, Ranks(r, world)) for r in range(world)]
        assert sum(shares) == n_rows
        rows = [torch.tensor([i]) for i in range(n_rows)]
        taken = sorted(int(t) for r in range(world) for t in batches_of_rank(iter(rows), batch, Ranks(r, world)))
        assert taken == list(range(n_rows))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cache_the_same_rows_as_one_process(single, tmp_path, world):
    out = tmp_path / "multi"
    results = run_ranks(world, options(out), tmp_path)
    assert all(json.loads(r.stdout.strip().splitlines()[-1])["rows"] == single["n"] for r in results)
    acts, tokens = rows_of(out)
    ref_acts, ref_tokens = rows_of(single["plain"])
    assert row_keys(acts, tokens) == row_keys(ref_acts, ref_tokens)  # bit-identical rows: same batches
    meta = json.loads((out / "sae_cache.json").read_text())
    assert meta["world_size"] == world and meta["hooks"][HOOK]["stats"]["tokens_seen"] == single["n"] * 16


def test_shuffled_multi_rank_cache_is_reproducible(single, shuffled, tmp_path):
    again = tmp_path / "again"
    run_ranks(2, options(again, shuffle=True, seed=5), tmp_path)
    acts_a, tokens_a = rows_of(shuffled)
    acts_b, tokens_b = rows_of(again)
    assert torch.equal(tokens_a, tokens_b) and torch.equal(acts_a, acts_b)
    assert row_keys(acts_a, tokens_a) == row_keys(*rows_of(single["plain"]))


def test_a_killed_rank_resumes(shuffled, tmp_path):
    out = tmp_path / "killed"
    results = run_ranks(
        2, options(out, shuffle=True, seed=5, kill_rank=1, kill_at_forward=5), tmp_path, expect_ok=False
    )
    assert results[1].returncode == -signal.SIGKILL
    assert results[0].returncode != 0 and not out.exists()  # rank 0 failed instead of waiting forever
    shards = Path(str(out) + ".sae_cache-tmp") / "shards"
    assert (shards / "rank_00001" / "shard_00000.json").exists()  # written before the kill, kept
    assert not (shards / "rank_00001" / "shard_00002.json").exists()  # killed in its third buffer
    run_ranks(2, options(out, shuffle=True, seed=5, resume=True), tmp_path)
    names = sorted(p.name for p in shuffled.glob("*.arrow"))
    assert len(names) > 1 and names == sorted(p.name for p in out.glob("*.arrow"))
    for name in names:
        assert (out / name).read_bytes() == (shuffled / name).read_bytes()


def test_torchrun_on_gpus_pins_each_rank_to_its_gpu_with_a_backend_for_host_flags(monkeypatch):
    """NCCL reduces CUDA tensors only, while the ranks share their failures through a flag on the host: the group
    gets gloo for the host and NCCL for the GPUs, and each rank its LOCAL_RANK's GPU."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("gpu", index))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    assert distributed.init_from_env("cuda") == "cuda:1"
    assert calls == {"gpu": 1, "backend": "cpu:gloo,cuda:nccl"}
    assert distributed.init_from_env("cpu") == "cpu" and calls["backend"] == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize(
    ("config", "device"),
    [("cpu:gloo,cuda:gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl", "cuda:3")],
)
def test_the_failure_flag_goes_where_the_backend_reduces(monkeypatch, config, device):
    """A group a user initialised with NCCL alone reduces the flag on this rank's GPU."""
    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed._flag_device() == torch.device(device)
