"""Input data: open the dataset and turn its rows into token rows of context_size.

Owns where data comes from (a dataset object, the bundled demo text, a `save_to_disk` directory, a
local folder of data files or a Hub name), which column holds it (`tokens`/`input_ids` pretokenized,
`text`/`problem` raw, conversations with chat formatting), and the glue between the model's tokenization
(sae_cache.model) and the pure packing functions of `sae_cache.tokenization`. Every function takes the fields
it needs, not the whole config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from sae_cache.config import UNSET
from sae_cache.files import access_denied
from sae_cache.tokenization import pack_sequences, resolve_special_token, truncate_pretokenized

TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMNS = ("text", "problem")
CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")
Tokenize = Callable[[Any], torch.Tensor]  # one raw row value (text or conversation) -> 1-D token ids


@dataclass(frozen=True)
class InputColumn:
    """The column to read and whether it is already tokenized."""

    name: str
    pretokenized: bool


def open_dataset(
    dataset_path: str,
    *,
    streaming: bool = True,
    trust_remote_code: bool | None = None,
    override: Any = None,
) -> Dataset | IterableDataset:
    """The dataset to read: the override object, the demo text, a local directory or a Hub dataset."""
    from sae_cache.demo import DEMO_DATASET_NAME, load_demo_dataset

    if override is not None:
        dataset = override
    elif dataset_path == DEMO_DATASET_NAME:
        dataset = load_demo_dataset()
    else:
        dataset = _load(dataset_path, streaming=streaming, trust_remote_code=trust_remote_code)
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        if "train" not in dataset:
            raise ValueError(f"dataset {dataset_path!r} has splits {list(dataset)} but no 'train' split to read.")
        dataset = dataset["train"]
    if not isinstance(dataset, Dataset | IterableDataset):
        raise TypeError(
            f"override_dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}."
        )
    return dataset


def _load(dataset_path: str, *, streaming: bool, trust_remote_code: bool | None) -> Any:
    """A local directory (save_to_disk output, or data files) or a Hub dataset; what goes wrong is one ValueError
    that names dataset_path."""
    path = Path(dataset_path)
    if not dataset_path.strip():
        raise ValueError("dataset_path is empty: name a Hub dataset or a local directory, or pass override_dataset.")
    if path.is_file():
        raise ValueError(
            f"dataset_path={dataset_path!r} is a file: datasets (and SAELens) open a directory of data files, a "
            "save_to_disk directory or a Hub name. Put the file in a directory of its own and pass the directory."
        )
    denied = access_denied(path, os.R_OK | os.X_OK) if path.is_dir() else None
    if denied:
        raise ValueError(f"dataset_path={dataset_path!r} cannot be read: {denied}.")
    with reading(dataset_path):
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return load_from_disk(dataset_path)
        if path.is_dir():
            return load_dataset(dataset_path, split="train", streaming=streaming, trust_remote_code=trust_remote_code)
    if path.is_absolute() or dataset_path.startswith(("./", "../", "~")):
        raise ValueError(f"dataset_path={dataset_path!r} does not exist: check the path.")
    try:
        return load_dataset(dataset_path, split="train", streaming=streaming, trust_remote_code=trust_remote_code)
    except (FileNotFoundError, ConnectionError) as e:
        raise ValueError(
            f"dataset_path={dataset_path!r} is not a local directory, and datasets could not open it as a Hugging "
            f"Face Hub dataset ({_cause(e)}): check the path or the name."
        ) from None


@contextlib.contextmanager
def reading(dataset_path: str) -> Iterator[None]:
    """What datasets raises for local data without rows (an empty save_to_disk directory, an empty data file), as
    one ValueError that names dataset_path."""
    handlers = [*logging.getLogger("datasets").handlers, *logging.getLogger().handlers]  # where its records go
    for handler in handlers:
        handler.addFilter(_quiet_read_errors)  # datasets logs the error it then raises: ours says it once
    try:
        yield
    except (StopIteration, IndexError, pa.ArrowInvalid, DatasetGenerationError) as e:
        raise ValueError(
            f"dataset_path={dataset_path!r} has no rows that datasets can read ({_cause(e.__cause__ or e)}): point "
            "dataset_path at a dataset with rows (an empty data file gives this error)."
        ) from None
    finally:
        for handler in handlers:
            handler.removeFilter(_quiet_read_errors)


def _quiet_read_errors(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to read file")


def _cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def first_row(dataset: Dataset | IterableDataset, *, dataset_path: str | None = None) -> dict:
    """The first row of the dataset (an error if it has none); dataset_path: the path it was opened from."""
    with reading(dataset_path) if dataset_path is not None else contextlib.nullcontext():
        for row in dataset:
            return row
    where = f"dataset_path={dataset_path!r}" if dataset_path is not None else "override_dataset"
    raise ValueError(f"the dataset is empty ({where} holds no rows): point it at a dataset with rows.")


def find_column(row: dict, *, chat: bool) -> InputColumn:
    """The column the rows are read from, as SAELens picks it."""
    names = CHAT_COLUMNS if chat else TOKEN_COLUMNS + TEXT_COLUMNS
    for name in names:
        if name in row:
            return InputColumn(name, pretokenized=not chat and name in TOKEN_COLUMNS)
    raise ValueError(f"the dataset has columns {sorted(row)}; it needs one of {list(names)}.")


def resolve_context_size(
    column: InputColumn, row: dict, *, context_size: int, prepend_bos: bool, disable_concat: bool
) -> int:
    """context_size as set, or the length of the first row of a pretokenized dataset (context_size=-1)."""
    if column.pretokenized:
        length = len(row[column.name])
        if context_size == UNSET:
            return length
        if length < context_size:
            raise ValueError(
                f"the pretokenized dataset's first row has {length} tokens, fewer than context_size={context_size}: "
                f"set context_size to at most {length} (or -1 to use {length})."
            )
        return context_size
    if context_size == UNSET:
        raise ValueError(f"the dataset holds raw text (column {column.name!r}): set context_size (e.g. 128).")
    if context_size == 1 and prepend_bos and not disable_concat:
        raise ValueError(
            "context_size=1 with prepend_bos=True leaves no room for text (every row would be BOS): raise context_size."
        )
    return context_size


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the packing and the exclusion use, resolved against the tokenizer before any work."""

    bos: int | None
    separator: int | None
    excluded: list[int] | None


def resolve_special_tokens(
    tokenizer,
    *,
    prepend_bos: bool,
    sequence_separator_token: int | str | None,
    exclude_special_tokens: bool | list[int],
) -> SpecialTokens:
    """BOS (when prepend_bos), the sequence separator and the excluded ids, each a clear error when missing or
    outside the tokenizer's vocabulary."""
    separator = None
    if tokenizer is not None:
        separator = resolve_special_token(sequence_separator_token, tokenizer, field="sequence_separator_token")
    special = SpecialTokens(
        bos=tokenizer.bos_token_id if prepend_bos and tokenizer is not None else None,
        separator=separator,
        excluded=special_token_ids(exclude_special_tokens, tokenizer),
    )
    vocab = vocab_size(tokenizer)
    check_token_ids("sequence_separator_token", [] if separator is None else [separator], vocab)
    check_token_ids("exclude_special_tokens", special.excluded or [], vocab)
    return special


def vocab_size(tokenizer) -> int | None:
    """How many token ids the tokenizer has (ids are 0 to vocab_size - 1); None without a tokenizer."""
    return None if tokenizer is None else len(tokenizer)


def check_token_ids(field: str, ids: Iterable[int], vocab: int | None) -> None:
    """Every token id a user gives must be one of the tokenizer's: the model has no embedding for any other."""
    outside = sorted({int(i) for i in ids if vocab is not None and not 0 <= int(i) < vocab})
    if outside:
        raise ValueError(
            f"{field} gives token id(s) {outside[:5]} outside the tokenizer's vocabulary of {vocab:,} ids "
            f"(0 to {vocab - 1:,}): use ids below {vocab:,}."
        )


def _within_vocab(rows: Iterator, vocab: int | None, field: str) -> Iterator:
    """The rows (or (row, labels) pairs) of a pretokenized dataset, each checked against the vocabulary."""
    for item in rows:
        tokens = item[0] if isinstance(item, tuple) else item
        if vocab is not None and len(tokens) and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab):
            check_token_ids(field, tokens.tolist(), vocab)
        yield item


def special_token_ids(exclude_special_tokens: bool | list[int], tokenizer) -> list[int] | None:
    """Token ids whose positions are dropped (exclude_special_tokens), None when nothing is excluded."""
    if exclude_special_tokens is False:
        return None
    if isinstance(exclude_special_tokens, list):
        return sorted(set(exclude_special_tokens))
    if tokenizer is None:
        raise ValueError("exclude_special_tokens=True needs the model's tokenizer: give the token ids as a list.")
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
    return sorted({int(t) for t in (getattr(tokenizer, a, None) for a in attrs) if t is not None})


def row_tokenizer(model, *, chat: bool) -> Tokenize:
    """How one raw row value becomes token ids: the model's text tokenization (no BOS, no truncation, as
    SAELens does), or its chat template (a string row becomes a one-message user conversation)."""
    if not chat:
        return model.tokenize
    return lambda value: model.tokenize_chat([{"role": "user", "content": value}] if isinstance(value, str) else value)


def token_rows(
    dataset: Dataset | IterableDataset,
    column: InputColumn,
    *,
    tokenize: Tokenize,
    context_size: int,
    special: SpecialTokens,
    disable_concat: bool = False,
    label_columns: list[str] | None = None,
    vocab: int | None = None,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, dict]]:
    """Token rows of exactly context_size tokens, as SAELens's ActivationsStore builds them.

    With label_columns every item is a (row, labels) pair: each row comes from one input row. A pretokenized
    row holding an id outside the vocabulary (`vocab` ids) is a ValueError, not a failed forward pass.
    """
    where = f"the pretokenized column {column.name!r}"
    if label_columns:
        rows = _labeled_rows(dataset, column, tokenize, context_size, special, label_columns)
        return _within_vocab(rows, vocab, where) if column.pretokenized else rows
    values = (row[column.name] for row in dataset)
    if column.pretokenized:
        return _within_vocab(truncate_pretokenized(values, context_size=context_size), vocab, where)
    return pack_sequences(
        map(tokenize, values),
        context_size=context_size,
        bos_token_id=special.bos,
        separator_token_id=special.separator,
        disable_concat=disable_concat,
    )


def check_dataset_size(
    dataset, column: InputColumn, *, rows_needed: int, context_size: int, tokenize: Tokenize
) -> str | None:
    """Before any forward pass: an error when a sized pretokenized dataset has too few rows, a warning
    (returned) when raw text looks too short (estimated from its first rows); None when fine or unknowable."""
    if not hasattr(dataset, "__len__"):
        return None  # streaming: the run itself stops with a clear error if the data runs out
    n = len(dataset)
    if column.pretokenized:
        if n < rows_needed:
            raise ValueError(
                f"the dataset has {n} rows of {context_size} tokens but training_tokens needs {rows_needed} rows: "
                f"lower training_tokens to at most {n * context_size} or use a larger dataset."
            )
        return None
    sample = dataset.select(range(min(n, 64)))[column.name]
    tokens_per_row = sum(len(tokenize(value)) for value in sample) / max(len(sample), 1)
    estimate = int(tokens_per_row * n)
    if estimate < rows_needed * context_size:
        return (
            f"the dataset looks too small: about {estimate:,} tokens (estimated from its first {len(sample)} rows) for "
            f"{rows_needed * context_size:,} needed; the run will stop when the data runs out."
        )
    return None


def label_dtypes(column: InputColumn, row: dict, *, label_columns: list[str], disable_concat: bool) -> dict[str, str]:
    """The numpy dtype of every label column (checked before any work: present, numeric, one row per input)."""
    if not label_columns:
        return {}
    if not column.pretokenized and not disable_concat:
        raise ValueError(
            "label_columns needs each cache row to come from one input row: set disable_concat_sequences=True "
            "(or use a pretokenized dataset)."
        )
    missing = [c for c in label_columns if c not in row]
    if missing:
        raise ValueError(f"label_columns {missing} are not columns of the dataset (it has {sorted(row)}).")
    dtypes = {}
    for name in label_columns:
        value = np.asarray(row[name])
        if value.dtype.kind not in "biuf" or value.ndim:
            raise ValueError(
                f"label column {name!r} holds {row[name]!r}: only numeric scalars (ints, floats, bools) can be "
                "carried; map it to ids first."
            )
        dtypes[name] = "bool" if value.dtype.kind == "b" else ("float64" if value.dtype.kind == "f" else "int64")
    return dtypes


def _labeled_rows(
    dataset, column: InputColumn, tokenize: Tokenize, context_size: int, special: SpecialTokens, label_columns
) -> Iterator[tuple[torch.Tensor, dict]]:
    for row in dataset:
        value = row[column.name]
        if column.pretokenized:
            rows = truncate_pretokenized([value], context_size=context_size)
        else:
            rows = pack_sequences(
                [tokenize(value)],
                context_size=context_size,
                bos_token_id=special.bos,
                separator_token_id=None,
                disable_concat=True,
            )
        for tokens in rows:
            yield tokens, {name: row[name] for name in label_columns}
