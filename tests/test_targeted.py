"""Position-targeted caching: span finding against a decode oracle, rows that never drift, batched equals
unbatched, length-sorted batching, the automatic batch size (fake CUDA OOM on CPU). The targeted Arrow columns'
round trip is in test_arrow_format.py."""

from __future__ import annotations

import json
import logging
import random

import datasets
import numpy as np
import pytest
import torch
from conftest import SHAPE_PROBE, WORDS
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from sae_cache import targeted
from sae_cache.metadata import METADATA_FILE
from sae_cache.model import PROBE_SHAPE
from sae_cache.target_spans import find_target, locate_prompts, span_positions, token_offsets, token_span
from sae_cache.targeted import TargetedCacheConfig, cache_targeted, length_order, padding_tokens

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
MISSING = 3  # the input row whose target is absent


def sentence(rng: random.Random, n_min: int = 2, n_max: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def substring_of(rng: random.Random, text: str) -> str:
    """A random piece of `text`: a word, part of a word, a leading-space word, or several words."""
    words = text.split()
    i = rng.randrange(len(words))
    kind = rng.randrange(4)
    if kind == 0:
        return words[i]
    if kind == 1 and len(words[i]) > 2:
        return words[i][1:-1]
    if kind == 2 and i > 0:
        return " " + words[i]
    return " ".join(words[i : i + 2])


@pytest.fixture(scope="module")
def prompts_dataset():
    rng = random.Random(3)
    prompts = [sentence(rng) + "." for _ in range(14)]
    targets = [substring_of(rng, p) for p in prompts]
    targets[MISSING] = "no such words"
    prompts[5] = "the river quickly the river slowly."  # two occurrences
    targets[5] = "river"
    n = len(prompts)
    features = Features(
        {
            "prompt": Value("string"),
            "target": Value("string"),
            "name": Value("string"),
            "year": Value("int32"),
            "known": ClassLabel(names=["unknown", "known"]),
            "score": Value("float64"),
            "tags": Sequence(Value("string")),
        }
    )
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "target": targets,
            "name": [f"entity-{i}" for i in range(n)],
            "year": list(range(1900, 1900 + n)),
            "known": [i % 2 for i in range(n)],
            "score": [i / 7 for i in range(n)],
            "tags": [["t"] * (i % 3) for i in range(n)],
        },
        features=features,
    )


def make_config(tmp_path, name: str = "cache", **overrides) -> TargetedCacheConfig:
    fields = dict(
        output_path=str(tmp_path / name),
        hook_names=HOOKS,
        label_columns=["name", "year", "known", "score", "tags"],
        n_positions=2,
        batch_size=3,
    )
    fields.update(overrides)
    return TargetedCacheConfig(**fields)


def reference(model, token_ids: list[int], positions: list[int], hook: str) -> torch.Tensor:
    """The activations of one prompt run alone (no padding, no mask), at `positions` (-1 gives zeros)."""
    tokens = torch.tensor([token_ids[: model.cfg.n_ctx]])
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook][0].reshape(tokens.shape[1], -1)
    return torch.stack([acts[p] if p >= 0 else torch.zeros_like(acts[0]) for p in positions])


def metadata(path) -> dict:
    return json.loads((path / METADATA_FILE).read_text())


# --- finding the target's tokens ------------------------------------------------------------------


def test_find_target_first_last_absent_and_empty():
    assert find_target("a river and a river", "river", "first") == (2, 7)
    assert find_target("a river and a river", "river", "last") == (14, 19)
    assert find_target("a river", "lake", "first") is None
    assert find_target("a river", "", "last") is None


def _decode_oracle(tokenizer, ids: list[int], target: str, occurrence: str) -> tuple[int, int]:
    """The seed guide's definition, by brute force: the shortest token run whose decoding contains the target."""
    text = lambda a, b: tokenizer.decode(ids[a:b])  # noqa: E731
    if occurrence == "first":
        end = next(k for k in range(len(ids) + 1) if target in text(0, k))
        return max(j for j in range(end) if target in text(j, end)), end
    start = max(j for j in range(len(ids)) if target in text(j, len(ids)))
    return start, next(k for k in range(start, len(ids) + 1) if target in text(start, k))


@pytest.mark.parametrize("occurrence", ["first", "last"])
def test_token_span_matches_the_decode_oracle_whatever_the_split(tokenizer, occurrence):
    rng = random.Random(11)
    checked = 0
    for _ in range(150):
        prompt = sentence(rng, 3, 10) + " " + sentence(rng, 1, 4)
        target = substring_of(rng, prompt)
        ids, offsets, text = token_offsets(tokenizer, prompt)
        span = token_span(offsets, *find_target(text, target, occurrence))
        assert span == _decode_oracle(tokenizer, ids, target, occurrence), (prompt, target)
        checked += span[1] - span[0] > 1
    assert checked > 50  # most targets span several tokens with this small vocabulary


def test_targets_split_inside_a_character(tokenizer):
    """'é' is two byte tokens sharing one character: the span ends on the token that completes it."""
    ids, offsets, text = token_offsets(tokenizer, "le café ☕ noir")
    first, last = token_span(offsets, *find_target(text, "café", "first"))
    assert tokenizer.decode(ids[first:last]).strip() == "café"
    assert tokenizer.decode(ids[: last - 1]).endswith("\ufffd")  # the span's last token finishes é
    first, last = token_span(offsets, *find_target(text, "☕", "first"))
    assert last - first == 3 and tokenizer.decode(ids[first:last]) == "☕"


class SlowTokenizer:
    """A tokenizer without offsets: exercises the prefix-decoding fallback."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.fast(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def decode(self, ids, **kwargs):
        return self.fast.decode(ids, **kwargs)


def test_prefix_decoding_fallback_gives_the_fast_offsets(tokenizer):
    rng = random.Random(5)
    for prompt in [sentence(rng) for _ in range(40)] + ["le café ☕ noir", "naïve  spaces\tand\nlines"]:
        assert token_offsets(SlowTokenizer(tokenizer), prompt) == token_offsets(tokenizer, prompt), prompt


def test_span_positions_take_the_last_tokens_and_pad_or_skip_short_spans():
    assert span_positions((4, 9), 2, "pad").tolist() == [7, 8]
    assert span_positions((4, 6), 4, "pad").tolist() == [-1, -1, 4, 5]
    assert span_positions((4, 6), 4, "skip") is None
    assert span_positions((4, 6), 2, "skip").tolist() == [4, 5]


def test_locate_counts_skips_and_shifts_for_bos(tokenizer):
    prompts, targets = ["the river", "the lake", "a blue river"], ["river", "lake!", "blue"]
    kwargs = dict(occurrence="first", n_positions=1, short_span="pad", n_ctx=None)
    with_bos, counts = locate_prompts(prompts, targets, tokenizer, bos_token_id=0, **kwargs)
    without, _ = locate_prompts(prompts, targets, tokenizer, bos_token_id=None, **kwargs)
    assert [r.source_index for r in with_bos] == [0, 2] and counts["not_found"] == 1
    for a, b in zip(with_bos, without):
        assert a.token_ids[0] == 0 and a.token_ids[1:].tolist() == b.token_ids.tolist()
        assert a.positions.tolist() == [b.positions[0] + 1]


# --- batching -------------------------------------------------------------------------------------


def test_padding_tokens_counted_exactly_and_sorting_reduces_them():
    lengths = np.array([3, 10, 4, 9])
    assert padding_tokens(lengths, length_order(lengths, False), 2) == (10 - 3) + (9 - 4)
    assert length_order(lengths, True).tolist() == [1, 3, 2, 0]
    assert padding_tokens(lengths, length_order(lengths, True), 2) == (10 - 9) + (4 - 3)
    rng = np.random.default_rng(0)
    realistic = np.clip(rng.lognormal(3.0, 0.6, 2000).astype(int), 4, 512)
    sorted_pads = padding_tokens(realistic, length_order(realistic, True), 32)
    assert sorted_pads < 0.05 * padding_tokens(realistic, length_order(realistic, False), 32)


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(model, prompts_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("targeted")
    return tmp / "cache", cache_targeted(make_config(tmp), prompts_dataset, model)


def test_rows_never_drift_and_carry_their_labels(cached, prompts_dataset, tokenizer):
    path, out = cached
    kept = [i for i in range(len(prompts_dataset)) if i != MISSING]
    assert out["source_index"] == kept
    for column in ("name", "year", "known", "score", "tags"):
        assert out[column] == [prompts_dataset[i][column] for i in kept]
        assert out.features[column] == prompts_dataset.features[column]
    for row in out:
        source = prompts_dataset[row["source_index"]]
        assert (
            row["token_ids"]
            == [tokenizer.bos_token_id] + tokenizer(source["prompt"], add_special_tokens=False)["input_ids"]
        )
        cached_text = tokenizer.decode(row["token_ids"][row["positions"][0] : row["positions"][1] + 1])
        assert source["target"].strip()[-1] in cached_text  # the cached tokens end the target
    counts = metadata(path)["counts"]
    assert counts == {
        "input_rows": 14,
        "kept": 13,
        "skipped": 1,
        "not_found": 1,
        "short_span": 0,
        "beyond_context": 0,
        "multiple_occurrences": counts["multiple_occurrences"],
    }
    assert counts["multiple_occurrences"] >= 1


def test_an_indices_mapping_is_followed(model, prompts_dataset, tmp_path):
    """A selected/shuffled dataset: source_index counts rows of the dataset as given, labels follow it."""
    view = prompts_dataset.shuffle(seed=4)
    out = cache_targeted(make_config(tmp_path, n_positions=1), view, model)
    assert len(out) == 13 and all(view[i]["name"] == name for i, name in zip(out["source_index"], out["name"]))
    assert view[[i for i in range(14) if i not in out["source_index"]][0]]["target"] == "no such words"


def test_batched_activations_equal_unbatched_passes(cached, model):
    path, out = cached
    out = out.with_format("torch")
    lengths = [len(t) for t in out["token_ids"]]
    assert len(set(lengths)) > 5  # batches really mix lengths (right padding is exercised)
    for row in out:
        for hook in HOOKS:
            expected = reference(model, row["token_ids"].tolist(), row["positions"].tolist(), hook)
            torch.testing.assert_close(row[hook], expected, rtol=1e-5, atol=1e-6)
    assert metadata(path)["padding"]["pad_tokens"] > 0


def test_the_cache_is_published_atomically_and_replaced_only_with_overwrite(cached, model, prompts_dataset):
    path, _ = cached
    siblings = sorted(p.name for p in path.parent.iterdir())
    assert siblings == ["cache"]  # no temporary or backup directory left
    with pytest.raises(ValueError, match="overwrite=True"):
        cache_targeted(make_config(path.parent), prompts_dataset, model)
    again = cache_targeted(make_config(path.parent, n_positions=1, overwrite=True), prompts_dataset, model)
    assert again.features[HOOKS[0]].shape == (1, 32) and sorted(p.name for p in path.parent.iterdir()) == ["cache"]


def test_sorting_and_shuffling_do_not_change_any_row(cached, model, prompts_dataset, tmp_path):
    _, base = cached
    base = base.with_format("numpy")
    unsorted = cache_targeted(make_config(tmp_path, "u", sort_by_length=False), prompts_dataset, model)
    shuffled = cache_targeted(make_config(tmp_path, "s", output_order="shuffle", seed=1), prompts_dataset, model)
    again = cache_targeted(make_config(tmp_path, "s2", output_order="shuffle", seed=1), prompts_dataset, model)
    assert unsorted["source_index"] == base["source_index"][:].tolist()
    assert shuffled["source_index"] == again["source_index"] != base["source_index"][:].tolist()
    assert sorted(shuffled["source_index"]) == base["source_index"][:].tolist()
    where = {s: i for i, s in enumerate(base["source_index"][:].tolist())}
    for other in (unsorted, shuffled):
        for row in other.with_format("numpy"):
            i = where[row["source_index"]]
            assert row["name"] == base[i]["name"] and row["positions"].tolist() == base[i]["positions"].tolist()
            np.testing.assert_allclose(row[HOOKS[1]], base[i][HOOKS[1]], rtol=1e-5, atol=1e-6)


def test_short_spans_are_padded_with_minus_one_and_zeros_or_skipped(model, tmp_path):
    data = Dataset.from_dict({"prompt": ["the river flows.", "a blue river."], "target": [".", "blue river"]})
    padded = cache_targeted(make_config(tmp_path, "p", n_positions=4, label_columns=[]), data, model).with_format(
        "numpy"
    )
    positions = padded["positions"][:]
    assert (positions[0][:3] == -1).all() and positions[0][3] == len(padded[0]["token_ids"]) - 1
    assert (padded[0][HOOKS[0]][:3] == 0).all() and (padded[0][HOOKS[0]][3] != 0).any()
    skipped = cache_targeted(
        make_config(tmp_path, "s", n_positions=4, short_span="skip", label_columns=[]), data, model
    )
    assert skipped["source_index"] == [1]
    assert metadata(tmp_path / "s")["counts"]["short_span"] == 1


def test_forward_stops_at_the_last_cached_token_and_targets_past_n_ctx_are_skipped(model, tmp_path):
    rng = random.Random(2)
    long_prompt = "river " + " ".join(sentence(rng, 12, 12) for _ in range(4))  # far longer than n_ctx=64
    data = Dataset.from_dict({"prompt": [long_prompt, long_prompt + " lake"], "target": ["river", "lake"]})
    assert len(model.tokenizer(long_prompt)["input_ids"]) > 2 * model.cfg.n_ctx
    out = cache_targeted(make_config(tmp_path, n_positions=1, label_columns=[]), data, model).with_format("torch")
    assert out["source_index"][:].tolist() == [0] and metadata(tmp_path / "cache")["counts"]["beyond_context"] == 1
    row = out[0]
    torch.testing.assert_close(
        row[HOOKS[0]], reference(model, row["token_ids"].tolist(), row["positions"].tolist(), HOOKS[0])
    )


# --- automatic batch size -------------------------------------------------------------------------


@pytest.fixture
def fake_oom(model):
    """fake_oom(limit): the model's forward passes raise CUDA OOM for batches larger than `limit` (None: every
    pass but the shape probe), through a torch forward pre-hook removed after the test; returns the batch sizes
    of every pass tried, the shape probe's included."""
    handles = []

    def install(limit: int | None) -> list[int]:
        tried: list[int] = []

        def pre_hook(module, args):
            tokens = args[0]
            tried.append(tokens.shape[0])
            if tuple(tokens.shape) != SHAPE_PROBE and (limit is None or tokens.shape[0] > limit):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

        handles.append(model.register_forward_pre_hook(pre_hook))
        return tried

    yield install
    for handle in handles:
        handle.remove()


def test_out_of_memory_halves_the_batch_and_reports_the_size(model, prompts_dataset, tmp_path, fake_oom, caplog):
    expected = cache_targeted(make_config(tmp_path, "ref", batch_size=2), prompts_dataset, model).with_format("numpy")
    tried = fake_oom(2)
    with caplog.at_level(logging.WARNING, logger="sae_cache"):
        out = cache_targeted(make_config(tmp_path, "oom", batch_size=8), prompts_dataset, model).with_format("numpy")
    assert tried[:4] == [PROBE_SHAPE[0], 8, 4, 2]  # the shape probe, then 8 and 4 fail, 2 fits
    assert set(tried[4:]) <= {1, 2}
    assert metadata(tmp_path / "oom")["batch_size"] == {"requested": 8, "found": 2}
    assert "going on with 4" in caplog.text and "going on with 2" in caplog.text
    assert out["source_index"][:].tolist() == expected["source_index"][:].tolist()
    for hook in HOOKS:
        np.testing.assert_array_equal(out[hook][:], expected[hook][:])  # the same batches: bit for bit


@pytest.mark.parametrize(("limit", "auto"), [(None, True), (2, False)])
def test_out_of_memory_is_raised_at_size_one_or_without_auto(model, prompts_dataset, tmp_path, fake_oom, limit, auto):
    tried = fake_oom(limit)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache_targeted(make_config(tmp_path, batch_size=4, auto_batch_size=auto), prompts_dataset, model)
    assert tried == ([2, 4, 2, 1] if auto else [2, 4])  # the shape probe, then down to one prompt (auto) or not
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a work directory is left


# --- bad input fails before any forward pass ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_positions": 0}, "n_positions"),
        ({"batch_size": 0}, "batch_size"),
        ({"occurrence": "middle"}, "occurrence"),
        ({"short_span": "extend"}, "short_span"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"label_columns": ["token_ids"]}, "twice"),
        ({"label_columns": ["name", "name"]}, "twice"),
        ({"hook_names": []}, "hook_names"),
        ({"target_column": "prompt"}, "prompt_column"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt_column": "text"}, "not in the dataset"),
        ({"label_columns": ["name", "country"]}, "country"),
        ({"target_column": "year"}, "not strings"),
        ({"hook_names": ["blocks.0.hook_resid_post", "blocks.9.hook_nothing"]}, "not found in the model"),
        ({"label_columns": [], "prompt_column": "name", "target_column": "tags"}, "not strings"),
    ],
)
def test_bad_input_fails_before_any_forward_pass(model, prompts_dataset, tmp_path, fake_oom, overrides, message):
    tried = fake_oom(None)
    with pytest.raises(ValueError, match=message):
        cache_targeted(make_config(tmp_path, **overrides), prompts_dataset, model)
    assert tried == [] and list(tmp_path.iterdir()) == []


def test_a_dataset_dict_is_refused(model, prompts_dataset, tmp_path):
    with pytest.raises(ValueError, match="pick a split"):
        cache_targeted(make_config(tmp_path), datasets.DatasetDict(train=prompts_dataset), model)


def test_no_kept_prompt_or_a_foreign_directory_fails_before_any_forward_pass(model, tmp_path, fake_oom):
    tried = fake_oom(None)
    data = Dataset.from_dict({"prompt": ["the river"], "target": ["lake"]})
    with pytest.raises(ValueError, match="no prompt kept"):
        cache_targeted(make_config(tmp_path, label_columns=[]), data, model)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        cache_targeted(make_config(tmp_path, label_columns=[]), data, model)
    assert tried == [] and (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def test_rows_split_across_several_files_keep_their_order(model, prompts_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(targeted, "FILE_BYTES", 2 * 2 * 64 * 4)  # two rows of two positions of 64 floats per file
    out = cache_targeted(make_config(tmp_path), prompts_dataset, model)
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 7
    assert out["source_index"] == [i for i in range(14) if i != MISSING]
