"""SAELens trains from compact caches through one call, `sae_cache.saelens.training_runner(cfg, ...)`.

Real `LanguageModelSAETrainingRunner` runs (offline, CPU, tiny model) from bfloat16 and int8 caches: SAELens's
store serves exactly the decoded rows, in order, never runs the model, and the SAE trains, saves and loads.
Without the adapter SAELens refuses a compact cache (no column named the hook) instead of reading bit patterns
as numbers; for float32/float16 caches the call is SAELens's own runner, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

pytest.importorskip("sae_lens")

from sae_lens import SAE  # noqa: E402
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner  # noqa: E402
from sae_lens.util import get_special_token_ids  # noqa: E402
from test_saelens_roundtrip import offline, training_config  # noqa: E402, F401  (offline: autouse, no network)

from sae_cache import CacheActivationsRunner, CachedActivations  # noqa: E402
from sae_cache.saelens import DecodedRows, training_runner  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def cache_of(make_cfg, text_dataset, model, dtype: str, **overrides) -> Path:
    cfg = make_cfg(dtype=dtype, **{"shuffle": True, **overrides})
    CacheActivationsRunner(cfg, override_dataset=text_dataset, model=model).run()
    return Path(cfg.new_cached_activations_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_saelens_trains_from_a_compact_cache_through_one_call(
    dtype, make_cfg, text_dataset, model, tmp_path, monkeypatch
):
    cache = cache_of(make_cfg, text_dataset, model, dtype)
    decoded, _ = CachedActivations(cache).rows(0, 40)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("SAELens ran the model"))
    cfg = training_config(cache, HOOK, tmp_path)

    runner = training_runner(cfg, override_model=model, override_dataset=text_dataset)

    assert isinstance(runner, LanguageModelSAETrainingRunner) and cfg.use_cached_activations
    store = runner.activations_store
    assert isinstance(store.cached_activation_dataset, DecodedRows)
    served: list[torch.Tensor] = []
    serve = store.get_raw_llm_batch
    monkeypatch.setattr(store, "get_raw_llm_batch", lambda *a, **k: served.append(serve(*a, **k)) or served[-1])
    initial = {name: p.detach().clone() for name, p in runner.sae.named_parameters()}

    sae = runner.run()

    rows = torch.cat([acts for acts, _ in served]).reshape(-1, 16, 32)
    assert len(rows) * 16 >= cfg.training_tokens
    assert torch.equal(rows, decoded[: len(rows)])  # SAELens trained on the decoded rows, in the cache's order
    assert all(ids.dtype == torch.float32 for _, ids in served)  # token ids as SAELens's own loading gives them
    params = dict(sae.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(initial[name], p.detach()) for name, p in params.items())
    loaded = SAE.load_from_disk(cfg.output_path, device="cpu")
    assert torch.equal(loaded.W_dec.detach(), sae.W_dec.detach()) and loaded.cfg.metadata.hook_name == HOOK
    assert list(cwd.iterdir()) == []


def test_saelens_without_the_adapter_refuses_a_compact_cache(make_cfg, text_dataset, model, tmp_path):
    cfg = training_config(cache_of(make_cfg, text_dataset, model, "int8"), HOOK, tmp_path)
    with pytest.raises(ValueError, match=HOOK):
        LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=text_dataset)


def test_plain_caches_get_saelens_own_runner_unchanged(make_cfg, text_dataset, model, tmp_path):
    cache = cache_of(make_cfg, text_dataset, model, "float16")
    runner = training_runner(
        training_config(cache, HOOK, tmp_path), override_model=model, override_dataset=text_dataset
    )
    assert isinstance(runner.activations_store.cached_activation_dataset, datasets.Dataset)


def test_the_adapter_checks_the_shape_and_the_hook(make_cfg, text_dataset, model, tmp_path):
    cache = cache_of(make_cfg, text_dataset, model, "bfloat16")
    cfg = training_config(cache, HOOK, tmp_path, context_size=15)
    with pytest.raises(ValueError, match="context_size=15"):
        training_runner(cfg, override_model=model, override_dataset=text_dataset)
    assert cfg.use_cached_activations
    with pytest.raises(ValueError, match="not in this cache"):
        DecodedRows(cache, "blocks.0.hook_resid_post", dtype=torch.float32, device="cpu")


def test_exclude_special_tokens_works_through_the_adapter(make_cfg, text_dataset, model, tmp_path):
    cache = cache_of(make_cfg, text_dataset, model, "int8", shuffle=False)
    cfg = training_config(cache, HOOK, tmp_path, exclude_special_tokens=True, store_batch_size_prompts=40)
    store = training_runner(cfg, override_model=model, override_dataset=text_dataset).activations_store

    kept = store.get_filtered_llm_batch()

    acts, ids = CachedActivations(cache).rows(0, 40)
    special = torch.tensor(get_special_token_ids(model.tokenizer))
    keep = ~torch.isin(ids.reshape(-1).long(), special)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(kept, acts.reshape(-1, 32)[keep])
