"""The input stage (sae_cache.data) driven directly: which dataset is opened, which column is read, the context
size, the token rows (equal to SAELens's packing of the model's tokens), the size and label checks made before any
forward pass, and the special tokens."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from sae_cache.adapters import adapt
from sae_cache.config import UNSET
from sae_cache.data import (
    InputColumn,
    SpecialTokens,
    check_dataset_size,
    find_column,
    first_row,
    label_dtypes,
    open_dataset,
    resolve_context_size,
    resolve_special_tokens,
    row_tokenizer,
    token_rows,
)
from sae_cache.model import ModelAdapter

TEXT = InputColumn("text", pretokenized=False)
TOKENS = InputColumn("input_ids", pretokenized=True)


@pytest.fixture(scope="module")
def adapter(model):
    return adapt(model)


def saelens_rows(model, texts, context_size, *, bos=True, separator="bos", disable_concat=False) -> list[list[int]]:
    """Token rows as SAELens builds them from raw text with the model's own to_tokens."""
    tok = model.tokenizer
    sep = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, None: None}[separator]
    stream = (model.to_tokens(t, prepend_bos=False, truncate=False).squeeze(0) for t in texts)
    rows = concat_and_batch_sequences(
        stream,
        context_size,
        begin_batch_token_id=tok.bos_token_id if bos else None,
        sequence_separator_token_id=sep,
        disable_concat_sequences=disable_concat,
    )
    return [row.tolist() for row in rows]


# -- opening the dataset ------------------------------------------------------------------------------


def test_an_override_object_is_used_as_it_is(text_dataset):
    assert open_dataset("ignored/name", override=text_dataset) is text_dataset
    streamed = text_dataset.to_iterable_dataset()
    assert open_dataset("ignored/name", override=streamed) is streamed
    assert open_dataset("x", override=DatasetDict(train=text_dataset, test=text_dataset)) is text_dataset


def test_a_dataset_dict_without_train_and_a_non_dataset_are_refused(text_dataset):
    with pytest.raises(ValueError, match=r"dataset 'x' has splits \['validation'\] but no 'train' split"):
        open_dataset("x", override=DatasetDict(validation=text_dataset))
    for bad in (["some text"], {"text": ["some text"]}, "text"):
        with pytest.raises(TypeError, match=f"must be a datasets.Dataset or IterableDataset, got {type(bad).__name__}"):
            open_dataset("x", override=bad)


def test_a_save_to_disk_directory_is_loaded(text_dataset, tmp_path):
    text_dataset.save_to_disk(str(tmp_path / "one"))
    loaded = open_dataset(str(tmp_path / "one"))
    assert isinstance(loaded, Dataset) and loaded["text"] == text_dataset["text"]
    DatasetDict(train=text_dataset.select(range(5))).save_to_disk(str(tmp_path / "dict"))
    assert open_dataset(str(tmp_path / "dict"))["text"] == text_dataset["text"][:5]  # its train split


def test_a_folder_of_data_files_is_streamed_or_loaded(text_dataset, tmp_path):
    text_dataset.select(range(30)).to_parquet(str(tmp_path / "train.parquet"))
    streamed = open_dataset(str(tmp_path))
    assert isinstance(streamed, IterableDataset)
    assert [row["text"] for row in streamed] == text_dataset["text"][:30]
    loaded = open_dataset(str(tmp_path), streaming=False)
    assert isinstance(loaded, Dataset) and loaded["text"] == text_dataset["text"][:30]


def test_first_row_of_an_empty_dataset_is_a_clear_error():
    assert first_row(Dataset.from_dict({"text": ["a", "b"]})) == {"text": "a"}
    with pytest.raises(ValueError, match="the dataset is empty"):
        first_row(Dataset.from_dict({"text": []}))


# -- the column and the context size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "chat", "expected"),
    [
        ({"tokens": [1], "text": "a"}, False, InputColumn("tokens", True)),
        ({"input_ids": [1], "text": "a"}, False, InputColumn("input_ids", True)),
        ({"text": "a", "problem": "b"}, False, InputColumn("text", False)),
        ({"problem": "b", "id": 3}, False, InputColumn("problem", False)),
        ({"messages": [], "text": "a"}, True, InputColumn("messages", False)),
        ({"conversation": [], "messages": []}, True, InputColumn("conversation", False)),
        ({"text": "a", "input_ids": [1]}, True, InputColumn("text", False)),
    ],
)
def test_find_column_picks_as_saelens_does(row, chat, expected):
    assert find_column(row, chat=chat) == expected


def test_find_column_lists_what_it_needs():
    with pytest.raises(ValueError, match=r"the dataset has columns \['body', 'id'\]; it needs one of \['tokens'"):
        find_column({"id": 1, "body": "x"}, chat=False)
    with pytest.raises(ValueError, match=r"it needs one of \['conversation', 'conversations', 'messages', 'text'\]"):
        find_column({"input_ids": [1]}, chat=True)


def test_resolve_context_size():
    row = {"input_ids": list(range(24)), "text": "a b"}
    options = dict(prepend_bos=True, disable_concat=False)
    assert resolve_context_size(TOKENS, row, context_size=UNSET, **options) == 24  # -1: the first row's length
    assert resolve_context_size(TOKENS, row, context_size=16, **options) == 16
    with pytest.raises(ValueError, match=r"first row has 24 tokens, fewer than context_size=32: set context_size to"):
        resolve_context_size(TOKENS, row, context_size=32, **options)
    assert resolve_context_size(TEXT, row, context_size=16, **options) == 16
    with pytest.raises(ValueError, match=r"raw text \(column 'text'\): set context_size"):
        resolve_context_size(TEXT, row, context_size=UNSET, **options)
    with pytest.raises(ValueError, match="context_size=1 with prepend_bos=True leaves no room"):
        resolve_context_size(TEXT, row, context_size=1, **options)
    assert resolve_context_size(TEXT, row, context_size=1, prepend_bos=False, disable_concat=False) == 1
    assert resolve_context_size(TEXT, row, context_size=1, prepend_bos=True, disable_concat=True) == 1


# -- token rows --------------------------------------------------------------------------------------------


def test_pretokenized_rows_are_cut_to_the_context_size(token_dataset):
    special = SpecialTokens(bos=0, separator=0, excluded=None)  # not used for pretokenized rows
    rows = list(token_rows(token_dataset, TOKENS, tokenize=None, context_size=10, special=special))
    assert len(rows) == len(token_dataset)
    assert all(row.dtype == torch.long for row in rows)
    assert [row.tolist() for row in rows] == [ids[:10] for ids in token_dataset["input_ids"]]


@pytest.mark.parametrize(
    ("bos", "separator", "disable_concat"),
    [(True, "bos", False), (False, "eos", False), (True, None, False), (True, "bos", True)],
    ids=["bos-sep", "no-bos-eos-sep", "no-sep", "no-concat"],
)
def test_raw_text_is_packed_as_saelens_packs_the_models_tokens(
    model, adapter, text_dataset, bos, separator, disable_concat
):
    special = resolve_special_tokens(
        adapter.tokenizer, prepend_bos=bos, sequence_separator_token=separator, exclude_special_tokens=False
    )
    texts = text_dataset.select(range(60))
    rows = token_rows(
        texts,
        TEXT,
        tokenize=row_tokenizer(adapter, chat=False),
        context_size=16,
        special=special,
        disable_concat=disable_concat,
    )
    expected = saelens_rows(model, texts["text"], 16, bos=bos, separator=separator, disable_concat=disable_concat)
    assert [row.tolist() for row in rows] == expected and len(expected) > 10


def test_labels_come_in_pairs_with_rows_of_one_input_row(model, adapter, text_dataset, token_dataset):
    texts = [*text_dataset["text"][:29], "a"]  # the last is shorter than a row: it gives none
    labeled = Dataset.from_dict({"text": texts, "label": list(range(30))})
    special = resolve_special_tokens(
        adapter.tokenizer, prepend_bos=True, sequence_separator_token="bos", exclude_special_tokens=False
    )
    pairs = list(
        token_rows(labeled, TEXT, tokenize=adapter.tokenize, context_size=8, special=special, label_columns=["label"])
    )
    expected = []
    for i, text in enumerate(labeled["text"]):
        expected += [(row, {"label": i}) for row in saelens_rows(model, [text], 8, disable_concat=True)]
    assert [(row.tolist(), labels) for row, labels in pairs] == expected
    assert {labels["label"] for _, labels in pairs} == set(range(29))  # one row per input row, cut to the context

    labeled_ids = token_dataset.select(range(6)).add_column("y", [0.5 * i for i in range(6)])
    pairs = list(token_rows(labeled_ids, TOKENS, tokenize=None, context_size=5, special=special, label_columns=["y"]))
    assert [(row.tolist(), labels) for row, labels in pairs] == [
        (ids[:5], {"y": 0.5 * i}) for i, ids in enumerate(labeled_ids["input_ids"])
    ]


def test_chat_rows_go_through_the_chat_template(tokenizer):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenize = row_tokenizer(ModelAdapter(types.SimpleNamespace(tokenizer=templated)), chat=True)
    expected = templated("user: the river is blue\n", add_special_tokens=False)["input_ids"]
    assert tokenize("the river is blue").tolist() == expected  # a string row is one user message
    conversation = [{"role": "user", "content": "seven"}, {"role": "assistant", "content": "eleven"}]
    expected = templated("user: seven\nassistant: eleven\n", add_special_tokens=False)["input_ids"]
    assert tokenize(conversation).tolist() == expected


# -- checks before any forward pass -------------------------------------------------------------------------


def test_check_dataset_size(adapter, token_dataset, text_dataset):
    tokenize = adapter.tokenize
    with pytest.raises(
        ValueError,
        match=r"has 200 rows of 24 tokens but training_tokens needs 201 rows: lower training_tokens to at most 4800",
    ):
        check_dataset_size(token_dataset, TOKENS, rows_needed=201, context_size=24, tokenize=tokenize)
    assert check_dataset_size(token_dataset, TOKENS, rows_needed=200, context_size=24, tokenize=tokenize) is None
    small = Dataset.from_dict({"text": ["a short text with few tokens"] * 3})
    warning = check_dataset_size(small, TEXT, rows_needed=40, context_size=16, tokenize=tokenize)
    n_tokens = 3 * len(tokenize("a short text with few tokens"))
    assert warning.startswith(f"the dataset looks too small: about {n_tokens:,} tokens (estimated from its first 3")
    assert "640 needed" in warning
    assert check_dataset_size(text_dataset, TEXT, rows_needed=40, context_size=16, tokenize=tokenize) is None
    streamed = small.to_iterable_dataset()  # no length: the run itself stops when the data runs out
    assert check_dataset_size(streamed, TEXT, rows_needed=10**6, context_size=16, tokenize=tokenize) is None


def test_label_dtypes_and_their_errors():
    row = {"text": "a", "input_ids": [1], "n": 3, "x": 0.5, "flag": True, "name": "b", "tags": [1, 2]}
    dtypes = label_dtypes(TEXT, row, label_columns=["n", "x", "flag"], disable_concat=True)
    assert dtypes == {"n": "int64", "x": "float64", "flag": "bool"}
    assert label_dtypes(TOKENS, row, label_columns=["n"], disable_concat=False) == {"n": "int64"}
    assert label_dtypes(TEXT, row, label_columns=[], disable_concat=False) == {}
    with pytest.raises(ValueError, match="set disable_concat_sequences=True"):
        label_dtypes(TEXT, row, label_columns=["n"], disable_concat=False)
    with pytest.raises(ValueError, match=r"label_columns \['nope', 'other'\] are not columns of the dataset"):
        label_dtypes(TEXT, row, label_columns=["n", "nope", "other"], disable_concat=True)
    for bad in ("name", "tags"):
        with pytest.raises(ValueError, match=f"label column '{bad}' holds .*only numeric scalars"):
            label_dtypes(TEXT, row, label_columns=[bad], disable_concat=True)


def test_resolve_special_tokens(tokenizer):
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id)
    special = resolve_special_tokens(
        tokenizer, prepend_bos=True, sequence_separator_token="eos", exclude_special_tokens=True
    )
    assert special == SpecialTokens(bos=ids[0], separator=ids[1], excluded=sorted(set(ids)))
    special = resolve_special_tokens(
        tokenizer, prepend_bos=False, sequence_separator_token=9, exclude_special_tokens=[7, 3, 7]
    )
    assert special == SpecialTokens(bos=None, separator=9, excluded=[3, 7])
    assert resolve_special_tokens(
        None, prepend_bos=True, sequence_separator_token="bos", exclude_special_tokens=False
    ) == SpecialTokens(bos=None, separator=None, excluded=None)  # a model without a tokenizer: pretokenized data
    with pytest.raises(ValueError, match="exclude_special_tokens=True needs the model's tokenizer"):
        resolve_special_tokens(None, prepend_bos=False, sequence_separator_token=None, exclude_special_tokens=True)
    with pytest.raises(ValueError, match="sequence_separator_token='sep' but the tokenizer has no sep token"):
        no_sep = copy.deepcopy(tokenizer)
        no_sep.sep_token = None
        resolve_special_tokens(no_sep, prepend_bos=True, sequence_separator_token="sep", exclude_special_tokens=False)
