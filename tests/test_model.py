"""The model seam (sae_cache.model) driven directly: a TransformerLens model behind `adapt()`, hook widths from the
shape probe, missing hooks named, captures equal to `run_with_cache`, the pass stopped after the deepest hook,
hooks removed whatever happens, and text tokenized as SAELens does."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from sae_cache.adapters import adapt
from sae_cache.model import ModelAdapter, _StopForward
from sae_cache.tl_model import TransformerLensAdapter, stop_layer

HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def adapter(model) -> TransformerLensAdapter:
    return adapt(model)


@pytest.fixture(scope="module")
def tokens(tokenizer) -> torch.Tensor:
    return torch.randint(4, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(1))


def truth(model, tokens, hooks, positions=slice(None)) -> dict[str, torch.Tensor]:
    """run_with_cache at the kept positions, each hook flattened to (batch, positions, width) as SAELens does."""
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    return {h: cache[h][:, positions].reshape(len(tokens), -1, cache[h][0, 0].numel()) for h in hooks}


@pytest.fixture
def block_calls(model):
    """How many times each of the model's blocks and its unembedding was entered (torch forward pre-hooks,
    removed after)."""
    calls = {name: 0 for name in ["blocks.0", "blocks.1", "blocks.2", "unembed"]}
    handles = []
    for name in calls:

        def count(module, args, name=name):
            calls[name] += 1

        handles.append(model.get_submodule(name).register_forward_pre_hook(count))
    yield calls
    for handle in handles:
        handle.remove()


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


# -- what the model is ------------------------------------------------------------------------------


def test_adapt_wraps_a_hooked_transformer_and_keeps_an_adapter(model, adapter):
    assert isinstance(adapter, TransformerLensAdapter) and adapter.model is model
    assert adapt(adapter) is adapter
    assert adapter.device == torch.device("cpu") and adapter.n_ctx == 64 and adapter.causal
    assert adapter.tokenizer is model.tokenizer and adapter.default_prepend_bos == model.cfg.default_prepend_bos
    assert set(adapter.hook_names()) == set(model.hook_dict) and "blocks.2.hook_resid_post" in adapter.hook_names()


@pytest.mark.parametrize("obj", [torch.nn.Linear(2, 2), "gpt2", None], ids=["torch-module", "a-name", "none"])
def test_adapt_refuses_an_unsupported_object_with_a_clear_type_error(obj):
    with pytest.raises(TypeError, match=rf"model is a {type(obj).__name__}: pass a TransformerLens HookedTransformer"):
        adapt(obj)


def test_the_base_adapter_leaves_each_library_its_part():
    base = ModelAdapter(torch.nn.Linear(2, 2))
    assert base.device == torch.device("cpu") and base.n_ctx is None and base.name == "Linear"
    for call in (lambda: base.tokenize("x"), base.hook_names, lambda: base.check_hooks(["h"])):
        with pytest.raises(NotImplementedError):
            call()


# -- hooks -------------------------------------------------------------------------------------------


def test_hook_dims_flatten_heads_and_refuse_attention_patterns(adapter):
    dims = adapter.hook_dims(HOOKS + ["blocks.2.hook_resid_post", "blocks.0.attn.hook_q"])
    assert dims == {
        "hook_embed": 32,
        "blocks.0.hook_resid_post": 32,
        "blocks.1.attn.hook_z": 4 * 8,  # (n_heads, d_head) flattened, as SAELens does
        "blocks.1.mlp.hook_post": 64,
        "blocks.2.hook_resid_post": 32,
        "blocks.0.attn.hook_q": 4 * 8,
    }
    for hook in ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"]:
        with pytest.raises(ValueError, match=r"\(2, 4, 5, 5\) for a \(2, 5\) batch.*not attention patterns"):
            adapter.hook_dims(["blocks.0.hook_resid_post", hook])


def test_check_hooks_names_every_missing_hook_and_what_hooks_look_like(adapter):
    adapter.check_hooks(HOOKS)  # all present: no error
    with pytest.raises(ValueError) as error:
        adapter.check_hooks(["blocks.0.hook_resid_post", "blocks.7.hook_resid_post", "blocks.0.hook_typo"])
    message = str(error.value)
    assert "['blocks.7.hook_resid_post', 'blocks.0.hook_typo'] not found in the model" in message
    close = message.split("close names:")[1]  # what this model's hooks are called, nearest first
    assert "for 'blocks.7.hook_resid_post': blocks.2.hook_resid_post" in close and "hook_typo':" in close
    assert "python -m sae_cache hooks MODEL" in message


def test_stop_layer_is_one_past_the_deepest_block_or_none_outside_the_blocks():
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"]) == 3
    assert stop_layer(["blocks.1.mlp.hook_post"]) == 2
    assert stop_layer(["hook_embed", "blocks.0.hook_resid_post"]) is None
    assert stop_layer(["ln_final.hook_normalized"]) is None


@pytest.mark.parametrize(
    "hooks",
    [HOOKS, HOOKS[1:], ["blocks.1.attn.hook_z"]],
    ids=["with-a-hook-outside-the-blocks", "block-hooks", "one-head-hook"],
)
@pytest.mark.parametrize("positions", [slice(None), slice(2, 11, 3)], ids=["all", "sliced"])
def test_capture_equals_run_with_cache_for_several_hooks_at_once(model, adapter, tokens, hooks, positions):
    with adapter.capture(hooks, positions=positions) as cap:
        acts = cap(tokens)
        again = cap(tokens[:1])  # the hooks stay installed for the whole block
    expected, expected_again = truth(model, tokens, hooks, positions), truth(model, tokens[:1], hooks, positions)
    assert list(acts) == hooks
    for hook in hooks:
        assert torch.equal(acts[hook], expected[hook]), hook
        assert torch.equal(again[hook], expected_again[hook]), hook
    assert no_hooks_left(model)


def test_capture_without_flattening_keeps_the_head_dimension(model, adapter, tokens):
    with adapter.capture(["blocks.1.attn.hook_z"], flatten=False) as cap:
        acts = cap(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z"])
    assert acts["blocks.1.attn.hook_z"].shape == (3, 12, 4, 8)
    assert torch.equal(acts["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_z"])


@pytest.mark.parametrize(
    ("hooks", "ran"),
    [
        (["blocks.0.hook_resid_post"], ["blocks.0"]),
        (["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"], ["blocks.0", "blocks.1"]),
        (["hook_embed", "blocks.0.attn.hook_z"], ["blocks.0"]),  # stop_at_layer cannot: the last hook ends the pass
    ],
    ids=["stop-at-layer", "deepest-of-two", "raised-from-the-last-hook"],
)
def test_the_pass_stops_right_after_the_deepest_hook(model, adapter, tokens, block_calls, hooks, ran):
    with adapter.capture(hooks) as cap:
        cap(tokens)
        cap(tokens)
    assert block_calls == {name: 2 if name in ran else 0 for name in block_calls}
    assert no_hooks_left(model)


def test_hooks_are_removed_after_an_error_and_the_model_works_as_before(model, adapter, tokens):
    expected = model(tokens)

    def fail(module, args, output):
        raise RuntimeError("injected failure inside the pass")

    handle = model.blocks[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected"), adapter.capture(["blocks.1.hook_resid_post"]) as cap:
            cap(tokens)
    finally:
        handle.remove()
    assert no_hooks_left(model)
    assert torch.equal(model(tokens), expected)
    with pytest.raises(KeyError):  # a hook the model lacks fails while installing: the ones before it go too
        with adapter.capture(["blocks.0.hook_resid_post", "blocks.9.hook_resid_post"]):
            pass
    assert no_hooks_left(model)


def test_threads_capture_their_own_passes(model, adapter, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    expected = [truth(model, tokens[i : i + 1], hooks) for i in range(3)]
    results: dict[int, dict] = {}
    with adapter.capture(hooks) as cap:

        def work(i: int) -> None:
            for _ in range(5):
                results[i] = cap(tokens[i : i + 1])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(3):
        for hook in hooks:
            assert torch.equal(results[i][hook], expected[i][hook]), (i, hook)


def test_model_kwargs_and_the_attention_mask_reach_every_pass(model, adapter, tokens):
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    mask = torch.ones_like(tokens)
    try:
        with adapter.capture(["blocks.0.hook_resid_post"], model_kwargs={"return_type": None}) as cap:
            cap(tokens)
            cap(tokens, attention_mask=mask)
    finally:
        handle.remove()
    assert [sorted(kwargs) for kwargs in seen] == [
        ["return_type", "stop_at_layer"],
        ["attention_mask", "return_type", "stop_at_layer"],
    ]
    assert seen[0]["return_type"] is None and seen[0]["stop_at_layer"] == 1 and seen[1]["attention_mask"] is mask


# -- tokens ------------------------------------------------------------------------------------------


def test_text_tokens_equal_to_tokens_without_bos(model, adapter, text_dataset):
    for text in [row["text"] for row in text_dataset.select(range(20))] + ["", " a  b ", "\n"]:
        expected = model.to_tokens(text, prepend_bos=False, truncate=False, move_to_device=False).squeeze(0)
        assert torch.equal(adapter.tokenize(text), expected)


def test_tokenizing_never_truncates_and_leaves_the_model_defaults(model, adapter):
    long_text = " ".join(["river mountain"] * 80)  # far more tokens than n_ctx=64
    before = model.cfg.default_prepend_bos
    ids = adapter.tokenize(long_text)
    assert len(ids) > model.cfg.n_ctx
    assert torch.equal(ids, model.to_tokens(long_text, prepend_bos=False, truncate=False).squeeze(0))
    assert model.cfg.default_prepend_bos == before


def test_hooks_the_user_added_are_left_in_place(model, adapter, tokens):
    """A capture removes only the hooks it added: the user's own TransformerLens hooks keep firing after it."""
    seen = []
    point = model.hook_dict["blocks.0.hook_resid_post"]
    point.add_hook(lambda act, hook: seen.append(hook.name), dir="fwd")
    try:
        with adapter.capture(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]) as cap:
            cap(tokens)
        assert seen == ["blocks.0.hook_resid_post"]  # it fired beside ours during the capture
        model(tokens)
        assert seen == ["blocks.0.hook_resid_post"] * 2  # and is still installed afterwards
        assert len(point.fwd_hooks) == 1
    finally:
        model.reset_hooks(including_permanent=False)
    assert no_hooks_left(model)


def test_a_compiled_model_on_a_gpu_hands_out_copies_of_its_activations(model, monkeypatch):
    """CUDA graphs of a compiled model reuse their outputs' memory at the next replay, while the copy to the host may
    still read them: such a capture keeps copies. A plain model, or any model on the CPU, hands out the tensors."""
    compiled = adapt(torch.compile(model, backend="eager"))
    assert compiled.compiled and compiled.module is model and not adapt(model).compiled
    assert not compiled.capture(HOOKS[:1])._copy  # on the CPU
    monkeypatch.setattr(TransformerLensAdapter, "device", property(lambda self: torch.device("cuda")))
    assert not adapt(model).capture(HOOKS[:1])._copy
    capture = compiled.capture(HOOKS[:1])
    assert capture._copy
    capture._device, capture._local.captured = torch.device("cpu"), {}  # record on the CPU from here
    act = torch.randn(2, 3, 4)
    with contextlib.suppress(_StopForward):  # the last hook of a pass ends it
        capture._record(HOOKS[0], act)
    kept = capture._local.captured[HOOKS[0]]
    assert torch.equal(kept, act) and kept.data_ptr() != act.data_ptr()
