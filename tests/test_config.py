"""CacheActivationsRunnerConfig: SAELens compatibility and one clear ValueError per invalid combination."""

from __future__ import annotations

import dataclasses

import pytest
from sae_lens.config import CacheActivationsRunnerConfig as SaeLensConfig

from sae_cache import CacheActivationsRunnerConfig
from sae_cache.config import default_cache_path, sliced_length

SAELENS_KWARGS = dict(
    dataset_path="NeelNanda/pile-10k",
    model_name="gpt2",
    model_batch_size=8,
    hook_name="blocks.5.hook_resid_post",
    d_in=768,
    training_tokens=1_000_000,
    context_size=128,
    new_cached_activations_path="activations/x",
    shuffle=True,
    seed=1,
    dtype="float32",
    device="cpu",
    buffer_size_gb=0.5,
    hf_repo_id=None,
    hf_num_shards=None,
    hf_revision="main",
    hf_is_private_repo=False,
    model_kwargs={},
    model_from_pretrained_kwargs={},
    compile_llm=False,
    llm_compilation_mode=None,
    prepend_bos=True,
    seqpos_slice=(None,),
    streaming=True,
    autocast_lm=False,
    dataset_trust_remote_code=None,
    use_chat_formatting=False,
)


def test_every_saelens_field_exists_with_the_same_name():
    ours = {f.name for f in dataclasses.fields(CacheActivationsRunnerConfig)}
    theirs = {f.name for f in dataclasses.fields(SaeLensConfig)}
    assert theirs <= ours, theirs - ours
    pr612 = {
        "disable_concat_sequences",
        "sequence_separator_token",
        "exclude_special_tokens",
        "shuffle_across_sequences",
        "hook_layer",
    }
    assert pr612 <= ours


def test_a_saelens_config_constructs_ours_unchanged():
    theirs = SaeLensConfig(**SAELENS_KWARGS)
    ours = CacheActivationsRunnerConfig(**{f.name: getattr(theirs, f.name) for f in dataclasses.fields(SaeLensConfig)})
    for name, value in SAELENS_KWARGS.items():
        assert getattr(ours, name) == value, name


def test_saelens_positional_order_is_kept():
    ours = CacheActivationsRunnerConfig("ds", "m", 3, "blocks.0.hook_resid_post", 16, 1000, 10)
    assert (
        ours.dataset_path,
        ours.model_name,
        ours.model_batch_size,
        ours.d_in,
        ours.training_tokens,
        ours.context_size,
    ) == (
        "ds",
        "m",
        3,
        16,
        1000,
        10,
    )


def test_default_path_matches_saelens():
    cfg = CacheActivationsRunnerConfig(**{**SAELENS_KWARGS, "new_cached_activations_path": None})
    assert cfg.new_cached_activations_path == "activations/NeelNanda_pile-10k/gpt2/blocks.5.hook_resid_post"
    assert default_cache_path("a/b", "m", ["h1", "h2"]) == "activations/a_b/m/h1+h2"


def test_hooks_as_list_or_comma_string():
    assert CacheActivationsRunnerConfig(hook_name="blocks.0.hook_resid_post, blocks.1.hook_mlp_out").hook_names == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_mlp_out",
    ]
    assert CacheActivationsRunnerConfig(hook_name=["blocks.1.hook_resid_pre"]).hook_name == "blocks.1.hook_resid_pre"


def test_config_does_no_io(monkeypatch):
    import builtins

    def no_open(*args, **kwargs):
        raise AssertionError("the config opened a file")

    monkeypatch.setattr(builtins, "open", no_open)
    CacheActivationsRunnerConfig(dataset_path="some/hub-dataset", context_size=-1)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model_batch_size": 0}, "model_batch_size"),
        ({"training_tokens": -5}, "training_tokens"),
        ({"context_size": 0}, "context_size"),
        ({"context_size": 2000, "training_tokens": 1000}, "greater than training_tokens"),
        ({"d_in": 0}, "d_in"),
        ({"buffer_size_gb": 0}, "buffer_size_gb"),
        ({"buffer_size_gb": -1.0}, "buffer_size_gb"),
        ({"hf_num_shards": 0}, "hf_num_shards"),
        ({"seqpos_slice": (5, 5)}, "selects no position"),
        ({"seqpos_slice": (0, 10, 0)}, "step"),
        ({"seqpos_slice": (0, 10, -1)}, "step"),
        ({"seqpos_slice": (1, 2, 3, 4)}, "seqpos_slice"),
        ({"dtype": "float8"}, "dtype='float8' is not supported"),
        ({"dtype": "int4"}, "dtype"),
        ({"shuffle": False, "shuffle_across_sequences": True}, "shuffle_across_sequences=True requires shuffle=True"),
        ({"exclude_special_tokens": True}, "shuffle_across_sequences"),
        ({"exclude_special_tokens": [1, -2], "shuffle_across_sequences": True}, "non-negative"),
        ({"sequence_separator_token": "cls"}, "sequence_separator_token"),
        ({"sequence_separator_token": -3}, "sequence_separator_token"),
        ({"hook_layer": 3}, "hook_layer=3 contradicts"),
        ({"model_class_name": "HookedMamba"}, "model_class_name"),
        ({"use_chat_formatting": True, "context_size": -1}, "context_size"),
        ({"fp16_overflow": "ignore"}, "fp16_overflow"),
        ({"hook_name": "blocks.0.hook_resid_post,,x"}, "empty"),
        ({"hook_name": ["a", "a"]}, "repeats"),
        ({"hook_name": "token_ids"}, "token_ids"),
    ],
)
def test_invalid_values_raise_one_clear_error(overrides, fragment):
    fields = {"hook_name": "blocks.1.hook_resid_post", "context_size": 16, "training_tokens": 1000, **overrides}
    with pytest.raises(ValueError, match=fragment):
        CacheActivationsRunnerConfig(**fields)


def test_valid_combinations():
    cfg = CacheActivationsRunnerConfig(
        context_size=16,
        seqpos_slice=(1, None, 2),
        dtype="torch.float16",
        shuffle_across_sequences=True,
        exclude_special_tokens=[0, 1],
        sequence_separator_token="7",
        hook_layer=1,
        hook_name="blocks.1.hook_resid_post",
    )
    assert cfg.dtype == "float16"
    assert cfg.sequence_separator_token == 7
    assert cfg.seqpos_slice == (1, None, 2)


@pytest.mark.parametrize(
    ("context_size", "seqpos_slice", "expected"),
    [(8, (None,), 8), (8, (1,), 1), (8, (None, -1), 7), (8, (2, 8, 2), 3), (3, (5, None), 0), (8, (-2, None), 2)],
)
def test_sliced_length(context_size, seqpos_slice, expected):
    # A 1-tuple is the stop, as with slice(1): (1,) keeps only position 0.
    assert sliced_length(context_size, seqpos_slice) == expected


def test_an_empty_seqpos_slice_is_refused():
    with pytest.raises(ValueError, match="seqpos_slice"):
        CacheActivationsRunnerConfig(seqpos_slice=(), device="cpu")
