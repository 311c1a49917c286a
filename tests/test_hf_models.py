"""transformers models through sae_cache's AutoModelForCausalLM path, against SAELens 6.54 itself.

Tiny random GPT-2, Llama and Gemma-2 shaped models are saved to a directory and loaded by path (tests/hf_fixtures.py):
- text becomes the tokens HookedProxyLM.to_tokens gives, for the four kinds of tokenizer SAELens meets;
- the cache holds SAELens's ActivationsStore rows and its HookedProxyLM activations (run_with_cache), value for value,
  for residual-stream, MLP and attention-output hooks, several hooks in one pass, seqpos_slice, each separator,
  disable_concat_sequences, prepend_bos off and the chat template; block outputs equal the model's own
  hidden_states;
- the pass runs with use_cache=False and ends right after the deepest hooked module (nothing above it runs);
- a bad hook name fails before any pass over data, naming the close module paths; modules that cannot be cached
  (containers, outputs that are not tensors shaped (batch, position, ...)) are refused;
- from_pretrained keyword arguments (device_map, torch_dtype, attn_implementation) pass through;
- every kind of model object (PreTrainedModel with or without its tokenizer, HookedProxyLM, TransformerBridge,
  HookedTransformer) is cached and comes back as it was: the user's hooks, training flags and device.
"""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import datasets
import pytest
import torch
from hf_fixtures import (
    BATCH,
    CONTEXT,
    D_MODEL,
    HOOKS,
    KINDS,
    LAST_BLOCK,
    ROWS,
    build_tokenizer,
    cache_options,
    load,
    save_model,
    texts,
)
from hf_fixtures import tokenizer_with_add_bos as add_bos_tokenizer

pytest.importorskip("sae_lens")

from sae_lens.load_model import HookedProxyLM  # noqa: E402
from sae_lens.load_model import load_model as saelens_load_model  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig  # noqa: E402
from sae_cache.adapters import adapt, load_model  # noqa: E402
from sae_cache.model import PROBE_SHAPE  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    return {kind: save_model(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def text() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts(400)})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def config(model_dir: Path, out: Path, hooks, **overrides) -> CacheActivationsRunnerConfig:
    return CacheActivationsRunnerConfig(**cache_options(model_dir, out, hooks, **overrides))


def columns(dataset: datasets.Dataset) -> dict[str, torch.Tensor]:
    return dataset.with_format("torch")[:]


def saelens_rows(model, dataset, hooks: list[str], n_rows: int, **options) -> tuple[torch.Tensor, dict]:
    """SAELens's rows (sliced as its training sees them) and their activations from its own multi-hook store."""
    store = ActivationsStore.from_config_multi_hook(
        model,
        dataset=dataset,
        hook_names=hooks,
        hook_d_ins=dict.fromkeys(hooks, D_MODEL),
        streaming=False,
        context_size=CONTEXT,
        store_batch_size_prompts=BATCH,
        total_training_tokens=CONTEXT * n_rows,
        **options,
    )
    tokens, acts = [], {h: [] for h in hooks}
    for _ in range(math.ceil(n_rows / BATCH)):
        batch = store.get_batch_tokens(raise_at_epoch_end=True)
        tokens.append(batch[:, slice(*store.seqpos_slice)])
        for hook, act in store.get_multi_hook_activations(batch).items():
            acts[hook].append(act)
    return torch.cat(tokens)[:n_rows], {h: torch.cat(a)[:n_rows] for h, a in acts.items()}


# -- tokenization -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["no_bos", "bos_first", "bos_first_saved", "add_bos_right", "add_bos_left"])
def test_text_becomes_the_tokens_hooked_proxy_lm_gives(kind, saved):
    tokenizer = {
        "no_bos": lambda: build_tokenizer(bos_first=False),
        "bos_first": lambda: build_tokenizer(bos_first=True),
        "bos_first_saved": lambda: AutoTokenizer.from_pretrained(str(saved["llama"])),
        "add_bos_right": lambda: add_bos_tokenizer("right"),
        "add_bos_left": lambda: add_bos_tokenizer("left"),
    }[kind]()
    model = load(saved["gpt2"])
    proxy = HookedProxyLM(model, tokenizer, hook_names=[])
    ours = adapt(model, tokenizer)
    for sample in ["", "the river", " seven mountains  in paris.", *texts(20, seed=5)]:
        expected = proxy.to_tokens(sample, prepend_bos=False, padding_side=None, move_to_device=False, truncate=False)
        assert torch.equal(ours.tokenize(sample), expected.squeeze(0)), (kind, sample)
    assert ours.tokenize("the river")[0] == (0 if kind.startswith("bos_first") else ours.tokenize("the")[0])


# -- rows and activations equal SAELens's -------------------------------------------------------------------------

CASES = {
    "resid": dict(hooks=["resid"]),
    "mlp": dict(hooks=["mlp"]),
    "attn": dict(hooks=["attn"]),
    "several_hooks": dict(hooks=["attn", "mlp", "resid"]),
    "seqpos_slice": dict(hooks=["resid"], seqpos_slice=(2, 14, 3)),
    "eos_separator": dict(hooks=["resid"], sequence_separator_token="eos"),
    "no_separator": dict(hooks=["resid"], sequence_separator_token=None),
    "no_concat": dict(hooks=["resid"], disable_concat_sequences=True),
    "no_prepend_bos": dict(hooks=["resid"], prepend_bos=False),
    "chat_template": dict(hooks=["resid"], use_chat_formatting=True),
}


def tokens_per_row(options: dict) -> int:
    return len(range(CONTEXT)[slice(*options.get("seqpos_slice", (None,)))])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_cache_equals_saelens_rows_and_activations(kind, case, saved, text, tmp_path):
    options = dict(CASES[case])
    hooks = [HOOKS[kind][h] for h in options.pop("hooks")]
    ours = columns(CacheActivationsRunner(config(saved[kind], tmp_path / "c", hooks, **options), text).run())
    proxy = saelens_load_model("AutoModelForCausalLM", str(saved[kind]), device="cpu")
    n_rows = CONTEXT * ROWS // tokens_per_row(options)
    tokens, acts = saelens_rows(proxy, text, hooks, n_rows, **options)

    assert torch.equal(ours["token_ids"].long(), tokens)
    if "prepend_bos" not in options and "seqpos_slice" not in options:
        assert (tokens[:, 0] == 0).all()  # BOS opens every row
    for hook in hooks:
        assert ours[hook].shape == (n_rows, tokens_per_row(options), D_MODEL)
        torch.testing.assert_close(ours[hook], acts[hook], rtol=1e-5, atol=1e-6)
    if len(hooks) > 1:
        assert not torch.allclose(ours[hooks[0]], ours[hooks[1]])


@pytest.mark.parametrize("kind", KINDS)
def test_block_outputs_equal_the_models_own_hidden_states(kind, saved, text, tmp_path):
    """No hook involved on the reference side: output_hidden_states[i + 1] is block i's output."""
    hooks = [HOOKS[kind]["resid"].replace(".1", ".0"), HOOKS[kind]["resid"]]
    ours = columns(CacheActivationsRunner(config(saved[kind], tmp_path / "c", hooks), text).run())
    model = load(saved[kind])
    with torch.no_grad():
        hidden = model(ours["token_ids"].long(), output_hidden_states=True).hidden_states
    for layer, hook in enumerate(hooks):
        torch.testing.assert_close(ours[hook], hidden[layer + 1], rtol=1e-5, atol=1e-5)


# -- the forward pass ---------------------------------------------------------------------------------------------


def count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    calls = dict.fromkeys(modules, 0)
    handles = [
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, m in modules.items()
    ]
    return calls, handles


@pytest.mark.parametrize("kind", KINDS)
def test_the_pass_ends_right_after_the_deepest_hooked_module(kind, saved, text, tmp_path):
    model = load(saved[kind])
    named = dict(model.named_modules())
    attn = HOOKS[kind]["attn"]  # block 0's attention: block 0's MLP comes after it
    mlp_after = attn.rsplit(".", 1)[0] + ".mlp"
    watched = {n: named[n] for n in (attn, mlp_after, LAST_BLOCK[kind], "lm_head")}
    calls, handles = count_calls(watched)
    use_cache: list = []
    handles.append(
        model.register_forward_pre_hook(lambda m, a, kw: use_cache.append(kw.get("use_cache")), with_kwargs=True)
    )
    CacheActivationsRunner(config(saved[kind], tmp_path / "c", [attn]), text, model=model).run()
    for handle in handles:
        handle.remove()

    passes = math.ceil(ROWS / BATCH) + 1  # the data, and the shape probe
    assert calls == {attn: passes, mlp_after: 0, LAST_BLOCK[kind]: 0, "lm_head": 0}
    assert use_cache == [False] * passes


@pytest.mark.parametrize(
    ("kind", "hook", "message"),
    [
        ("llama", "model.layer.1", "close names: for 'model.layer.1': model.layers.1"),
        ("gpt2", "transformer.h.1.mlpp", "transformer.h.1.mlp"),
        ("gpt2", "blocks.1.hook_resid_post", "module paths such as 'model.layers.0'"),
        ("llama", "model.layers", "did not run in the forward pass"),
        ("llama", "model", "gives a BaseModelOutputWithPast, not a tensor"),
        ("llama", "model.rotary_emb", "for a (2, 5) batch of tokens"),
    ],
)
def test_a_bad_hook_fails_before_any_pass_over_data(kind, hook, message, saved, text, tmp_path):
    model = load(saved[kind])
    shapes: list = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    runner = CacheActivationsRunner(
        config(saved[kind], tmp_path / "c", [HOOKS[kind]["resid"], hook]), text, model=model
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.run()
    handle.remove()
    assert all(shape == PROBE_SHAPE for shape in shapes)  # at most the shape probe ran
    assert not (tmp_path / "c").exists()


# -- loading ------------------------------------------------------------------------------------------------------

KWARGS = {
    "device_map_bf16_eager": dict(device_map="cpu", torch_dtype="bfloat16", attn_implementation="eager"),
    "fp32_sdpa": dict(torch_dtype=torch.float32, attn_implementation="sdpa"),
}


@pytest.mark.parametrize("kwargs", KWARGS)
def test_from_pretrained_kwargs_pass_through(kwargs, saved, text, tmp_path):
    kw = KWARGS[kwargs]
    adapter = load_model(str(saved["llama"]), model_class_name="AutoModelForCausalLM", from_pretrained_kwargs=kw)
    module = adapter.module
    assert module.dtype == getattr(torch, str(kw["torch_dtype"]).replace("torch.", ""))
    assert module.config._attn_implementation == kw["attn_implementation"]
    assert not module.training and adapter.n_ctx == 64 and adapter.device == torch.device("cpu")

    hooks = [HOOKS["llama"]["resid"], HOOKS["llama"]["attn"]]
    cfg = config(saved["llama"], tmp_path / "c", hooks, model_from_pretrained_kwargs=kw)
    ours = columns(CacheActivationsRunner(cfg, text).run())
    proxy = saelens_load_model(
        "AutoModelForCausalLM", str(saved["llama"]), device="cpu", model_from_pretrained_kwargs=kw
    )
    tokens, acts = saelens_rows(proxy, text, hooks, ROWS)
    assert torch.equal(ours["token_ids"].long(), tokens)
    for hook in hooks:
        torch.testing.assert_close(ours[hook], acts[hook].float(), rtol=0, atol=0)


def test_without_a_device_map_the_model_goes_to_device(saved):
    on_meta = load_model(str(saved["gpt2"]), model_class_name="AutoModelForCausalLM", device="meta")
    assert on_meta.device == torch.device("meta")
    placed = load_model(
        str(saved["gpt2"]),
        model_class_name="AutoModelForCausalLM",
        device="meta",
        from_pretrained_kwargs={"device_map": "cpu"},
    )
    assert placed.device == torch.device("cpu")  # the device_map placed it; `device` is not applied on top


def test_a_device_map_that_offloads_sets_the_input_device_and_lets_passes_run_to_the_end(saved, monkeypatch):
    """accelerate offloads a layer mapped to "cpu" or "disk" beside GPU layers: its weights wait on the meta device and
    a hook of accelerate's moves them in for the layer's forward and out after it. Tokens go to that hook's execution
    device, and no pass is ended by raising (which would skip moving the weights out)."""
    adapter = load_model(str(saved["gpt2"]), model_class_name="AutoModelForCausalLM", device="cpu")
    hooks = ["transformer.h.0"]
    assert not adapter.stops_by_itself(hooks)  # one device: the pass is ended after the deepest hook
    monkeypatch.setattr(adapter.module, "hf_device_map", {"": "cpu"}, raising=False)
    assert not adapter.stops_by_itself(hooks)  # all on the CPU: nothing is offloaded
    monkeypatch.setattr(adapter.module, "hf_device_map", {"transformer.wte": 0, "transformer.h": "cpu"}, raising=False)
    assert adapter.stops_by_itself(hooks)
    monkeypatch.setattr(adapter.module, "hf_device_map", {"transformer": 0, "lm_head": "disk"}, raising=False)
    assert adapter.stops_by_itself(hooks)
    embeddings = adapter.module.get_input_embeddings()
    monkeypatch.setattr(embeddings, "_hf_hook", types.SimpleNamespace(execution_device=0), raising=False)
    assert adapter.device == torch.device("cuda", 0)


def test_unknown_model_classes_are_refused_listing_the_accepted_ones(make_cfg):
    with pytest.raises(ValueError, match=r"use one of \['HookedTransformer', 'AutoModelForCausalLM'\]"):
        make_cfg(model_class_name="AutoModelForSeq2SeqLM")
    with pytest.raises(ValueError, match="sae-cache/demo' is a HookedTransformer"):
        CacheActivationsRunnerConfig(model_class_name="AutoModelForCausalLM")
    with pytest.raises(ValueError, match="is not one of"):
        load_model("x", model_class_name="HookedMamba")
