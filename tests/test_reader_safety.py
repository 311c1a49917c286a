"""CachedActivations never hands out memory that crashes on write: batches are writable, zero-copy views of a
private (copy-on-write) memory map, so an in-place write changes this process's copy and never the file.

The writes run in a subprocess: a segmentation fault there fails the test instead of killing pytest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROW_BYTES

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, CachedActivations

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model, text_dataset):
    out = tmp_path_factory.mktemp("reader") / "cache"
    cfg = CacheActivationsRunnerConfig(
        dataset_path="unused-override-given",
        model_name="tiny",
        model_batch_size=5,
        hook_name=HOOK,
        training_tokens=16 * 40,
        context_size=16,
        new_cached_activations_path=str(out),
        shuffle=True,
        device="cpu",
        buffer_size_gb=10 * ROW_BYTES * 1.001 / 1e9,
    )
    CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    return out


def digests(cache) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.iterdir())}


WRITER = textwrap.dedent(
    """
    import json, sys, torch
    from sae_cache import CachedActivations

    reader = CachedActivations(sys.argv[1])
    acts, tokens = next(iter(reader.batches(16)))          # file order, one row: a view of the memory map
    before = acts.clone()
    acts.to("cpu").mul_(2)                                  # .to("cpu") is the same tensor on CPU
    tokens.add_(1)
    again, _ = next(iter(reader.batches(16)))               # the same reader, the same pages
    fresh, _ = next(iter(CachedActivations(sys.argv[1]).batches(16)))
    print(json.dumps({
        "doubled": torch.equal(acts, before * 2),
        "same_memory": torch.equal(again, before * 2),
        "fresh_is_original": torch.equal(fresh, before),
        "shuffled_writable": bool(next(iter(reader.batches(64, shuffle=True)))[0].add_(1).isfinite().all()),
        "spanning_writable": bool(next(iter(reader.batches(16 * 15)))[0].mul_(3).isfinite().all()),
    }))
    """
)


def test_writing_to_a_batch_changes_the_private_copy_never_the_file(cache):
    before = digests(cache)
    result = subprocess.run([sys.executable, "-c", WRITER, str(cache)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the process died ({result.returncode}):\n{result.stderr[-3000:]}"
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "not writable" not in result.stderr
    assert seen == {
        "doubled": True,
        "same_memory": True,  # zero-copy: the second pass of the same reader reads the pages just written
        "fresh_is_original": True,  # a new reader maps the file again: unchanged
        "shuffled_writable": True,
        "spanning_writable": True,
    }
    assert digests(cache) == before


def test_batches_in_file_order_are_views_and_equal_the_stored_rows(cache):
    reader = CachedActivations(cache)
    acts = torch.cat([a for a, _ in reader.batches(64)])
    stored = __import__("datasets").load_from_disk(str(cache)).with_format("torch")[:]
    assert torch.equal(acts, stored[HOOK].reshape(-1, 32))
    first, _ = next(iter(reader.batches(16)))
    assert first.numpy().flags.writeable


@pytest.mark.parametrize("size", [0, -5, True, 2.5, "64"])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_at_the_call(cache, size):
    reader = CachedActivations(cache)
    with pytest.raises(ValueError, match=r"batch_tokens=.* must be a positive integer"):
        reader.batches(size)  # not deferred to the first next()


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CachedActivations(tmp_path / "nope")
