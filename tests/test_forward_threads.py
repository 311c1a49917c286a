"""Concurrent forward passes on the CPU (forward_threads): same activations, same bytes, same errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import data_passes, fail_at_pass

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from sae_cache.store import resolve_forward_threads

HOOK = "blocks.1.hook_resid_post"


def run(cfg, dataset, model):
    return CacheActivationsRunner(cfg, override_dataset=dataset, model=model).run()


def data_bytes(cfg) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(cfg.new_cached_activations_path).glob("*.arrow"))]


def ground_truth(model, rows, hooks, batch_size):
    out = {h: [] for h in hooks}
    for start in range(0, len(rows), batch_size):
        _, cache = model.run_with_cache(rows[start : start + batch_size], names_filter=hooks)
        for h in hooks:
            out[h].append(cache[h].reshape(*cache[h].shape[:2], -1))
    return {h: torch.cat(v) for h, v in out.items()}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "hooks",
    [[HOOK], ["hook_embed", HOOK, "blocks.2.attn.hook_z"]],
    ids=["block-hook", "with-a-hook-outside-the-blocks"],
)
def test_threads_equal_run_with_cache(model, token_dataset, make_cfg, threads, hooks):
    cfg = make_cfg(context_size=-1, training_tokens=24 * 33, hook_name=hooks, d_in=-1, forward_threads=threads)
    ds = run(cfg, token_dataset, model).with_format("torch")[:]
    rows = torch.tensor(token_dataset["input_ids"][:33])
    assert torch.equal(ds["token_ids"].long(), rows)
    truth = ground_truth(model, rows, hooks, cfg.model_batch_size)
    for hook in hooks:
        assert torch.equal(ds[hook], truth[hook]), hook


def test_threads_write_the_same_bytes_as_one(model, text_dataset, make_cfg, tmp_path):
    options = dict(shuffle=True, shuffle_across_sequences=True, exclude_special_tokens=True)
    one = make_cfg(forward_threads=1, **options)
    three = make_cfg(forward_threads=3, new_cached_activations_path=str(tmp_path / "three"), **options)
    run(one, text_dataset, model)
    run(three, text_dataset, model)
    assert data_bytes(one) == data_bytes(three)


def test_no_forward_pass_is_wasted_and_the_model_is_left_clean(model, token_dataset, make_cfg):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = make_cfg(context_size=-1, training_tokens=24 * 33, forward_threads=2)
        with data_passes(model) as calls:
            run(cfg, token_dataset, model)
        assert torch.get_num_threads() == 2  # shared out during the run, restored after
    finally:
        torch.set_num_threads(before)
    assert len(calls) == math.ceil(33 / cfg.model_batch_size)  # no look-ahead batch beyond the last row
    assert len(set(calls)) == 2 and all(name.startswith("sae_cache-forward") for name in calls)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_an_error_on_a_forward_thread_stops_the_run_and_it_resumes_identically(model, text_dataset, make_cfg, tmp_path):
    cfg = make_cfg(forward_threads=2, shuffle=True)
    with data_passes(model, fail_at_pass(6, KeyboardInterrupt())) as calls, pytest.raises(KeyboardInterrupt):
        run(cfg, text_dataset, model)
    assert len(calls) >= 6 and all(name.startswith("sae_cache-forward") for name in calls)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    run(make_cfg(forward_threads=2, shuffle=True, resume=True), text_dataset, model)
    plain = make_cfg(forward_threads=1, shuffle=True, new_cached_activations_path=str(tmp_path / "plain"))
    run(plain, text_dataset, model)
    assert data_bytes(cfg) == data_bytes(plain)


def test_float16_overflow_on_a_forward_thread_is_one_clear_error(model, text_dataset, make_cfg):
    import copy

    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud.W_E.mul_(1e6)
    cfg = make_cfg(dtype="float16", hook_name="blocks.0.hook_resid_pre", forward_threads=2)
    with pytest.raises(ValueError, match="float16 range"):
        run(cfg, text_dataset, loud)
    assert not Path(cfg.new_cached_activations_path).exists()


def test_automatic_and_refused_thread_counts(make_cfg):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert resolve_forward_threads(None, torch.device("cpu")) == 1
        torch.set_num_threads(2)
        assert resolve_forward_threads(None, torch.device("cpu")) == 2
    finally:
        torch.set_num_threads(before)
    assert resolve_forward_threads(None, torch.device("cuda")) == 1
    assert resolve_forward_threads(1, torch.device("cuda")) == 1
    with pytest.raises(ValueError, match="only a model on the CPU"):
        resolve_forward_threads(2, torch.device("cuda"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="forward_threads"):
            CacheActivationsRunnerConfig(forward_threads=bad)


def test_a_run_never_changes_the_model_defaults(model, text_dataset, make_cfg, monkeypatch):
    """Raw text is tokenized on the calling thread while forward passes run on others; every forward
    pass saves and restores model.cfg.default_prepend_bos, so tokenizing must never set it (else the
    two interleave and the user's model can be left with prepend_bos off)."""
    cfg_class = type(model.cfg)
    values = []

    class Recording(cfg_class):
        def __setattr__(self, name, value):
            if name == "default_prepend_bos":
                values.append(value)
            super().__setattr__(name, value)

    before = model.cfg.default_prepend_bos
    monkeypatch.setattr(model.cfg, "__class__", Recording)
    run(make_cfg(forward_threads=2), text_dataset, model)
    assert values, "the forward passes save and restore the default: the recording works"
    assert set(values) == {before} and model.cfg.default_prepend_bos == before
