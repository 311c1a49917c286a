"""Input data: open the dataset and turn its rows into token rows of context_size.

Owns where data comes from (a dataset object, the bundled demo text, a `save_to_disk` directory, a
local folder of data files or a Hub name), which column holds it (`tokens`/`input_ids` pretokenized,
`text`/`problem` raw, conversations with chat formatting), and the glue between the model's tokenizer
and the pure packing functions of `sae_cache.tokenization`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from transformer_lens.utilities import get_tokens_with_bos_removed

from sae_cache.config import UNSET, CacheActivationsRunnerConfig
from sae_cache.tokenization import pack_sequences, resolve_special_token, truncate_pretokenized

TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMNS = ("text", "problem")
CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")


@dataclass(frozen=True)
class InputColumn:
    """The column to read and whether it is already tokenized."""

    name: str
    pretokenized: bool


def open_dataset(cfg: CacheActivationsRunnerConfig, override: Any = None) -> Dataset | IterableDataset:
    """The dataset to read: the override object, the demo text, a local directory or a Hub dataset."""
    from sae_cache.demo import DEMO_DATASET_NAME, load_demo_dataset

    if override is not None:
        dataset = override
    elif cfg.dataset_path == DEMO_DATASET_NAME:
        dataset = load_demo_dataset()
    elif (Path(cfg.dataset_path) / "state.json").exists() or (Path(cfg.dataset_path) / "dataset_dict.json").exists():
        dataset = load_from_disk(cfg.dataset_path)
    else:
        dataset = load_dataset(
            cfg.dataset_path,
            split="train",
            streaming=cfg.streaming,
            trust_remote_code=cfg.dataset_trust_remote_code,
        )
    if isinstance(dataset, DatasetDict | IterableDatasetDict):
        if "train" not in dataset:
            raise ValueError(f"dataset {cfg.dataset_path!r} has splits {list(dataset)} but no 'train' split to read.")
        dataset = dataset["train"]
    if not isinstance(dataset, Dataset | IterableDataset):
        raise TypeError(
            f"override_dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}."
        )
    return dataset


def first_row(dataset: Dataset | IterableDataset) -> dict:
    """The first row of the dataset (an error if it has none)."""
    for row in dataset:
        return row
    raise ValueError("the dataset is empty: point dataset_path at a dataset with rows.")


def find_column(row: dict, *, chat: bool) -> InputColumn:
    """The column the rows are read from, as SAELens picks it."""
    names = CHAT_COLUMNS if chat else TOKEN_COLUMNS + TEXT_COLUMNS
    for name in names:
        if name in row:
            return InputColumn(name, pretokenized=not chat and name in TOKEN_COLUMNS)
    raise ValueError(f"the dataset has columns {sorted(row)}; it needs one of {list(names)}.")


def resolve_context_size(cfg: CacheActivationsRunnerConfig, column: InputColumn, row: dict) -> int:
    """context_size from the config, or from the first row of a pretokenized dataset."""
    if column.pretokenized:
        length = len(row[column.name])
        if cfg.context_size == UNSET:
            return length
        if length < cfg.context_size:
            raise ValueError(
                f"the pretokenized dataset's first row has {length} tokens, fewer than context_size={cfg.context_size}: "
                f"set context_size to at most {length} (or -1 to use {length})."
            )
        return cfg.context_size
    if cfg.context_size == UNSET:
        raise ValueError(f"the dataset holds raw text (column {column.name!r}): set context_size (e.g. 128).")
    if cfg.context_size == 1 and cfg.prepend_bos and not cfg.disable_concat_sequences:
        raise ValueError(
            "context_size=1 with prepend_bos=True leaves no room for text (every row would be BOS): raise context_size."
        )
    return cfg.context_size


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the packing and the exclusion use, resolved against the tokenizer before any work."""

    bos: int | None
    separator: int | None
    excluded: list[int] | None


def resolve_special_tokens(cfg: CacheActivationsRunnerConfig, tokenizer) -> SpecialTokens:
    """BOS (when prepend_bos), the sequence separator and the excluded ids, each a clear error when missing."""
    return SpecialTokens(
        bos=tokenizer.bos_token_id if cfg.prepend_bos and tokenizer is not None else None,
        separator=resolve_special_token(cfg.sequence_separator_token, tokenizer, field="sequence_separator_token")
        if tokenizer is not None
        else None,
        excluded=special_token_ids(cfg, tokenizer),
    )


def token_rows(
    dataset: Dataset | IterableDataset,
    column: InputColumn,
    *,
    model,
    cfg: CacheActivationsRunnerConfig,
    context_size: int,
    special: SpecialTokens,
) -> Iterator[torch.Tensor]:
    """Token rows of exactly context_size tokens, as SAELens's ActivationsStore builds them.

    With cfg.label_columns every item is a (row, labels) pair: each row comes from one input row.
    """
    if cfg.label_columns:
        return _labeled_rows(dataset, column, model=model, cfg=cfg, context_size=context_size, special=special)
    values = (row[column.name] for row in dataset)
    if column.pretokenized:
        return truncate_pretokenized(values, context_size=context_size)
    return pack_sequences(
        _tokenize(values, model, chat=cfg.use_chat_formatting),
        context_size=context_size,
        bos_token_id=special.bos,
        separator_token_id=special.separator,
        disable_concat=cfg.disable_concat_sequences,
    )


def check_dataset_size(dataset, column: InputColumn, *, rows_needed: int, context_size: int, model) -> str | None:
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
    tokens_per_row = sum(len(t) for t in _tokenize(iter(sample), model, chat=False)) / max(len(sample), 1)
    estimate = int(tokens_per_row * n)
    if estimate < rows_needed * context_size:
        return (
            f"the dataset looks too small: about {estimate:,} tokens (estimated from its first {len(sample)} rows) for "
            f"{rows_needed * context_size:,} needed; the run will stop when the data runs out."
        )
    return None


def label_dtypes(dataset, column: InputColumn, cfg: CacheActivationsRunnerConfig, row: dict) -> dict[str, str]:
    """The numpy dtype of every label column (checked before any work: present, numeric, one row per input)."""
    if not cfg.label_columns:
        return {}
    if not column.pretokenized and not cfg.disable_concat_sequences:
        raise ValueError(
            "label_columns needs each cache row to come from one input row: set disable_concat_sequences=True "
            "(or use a pretokenized dataset)."
        )
    missing = [c for c in cfg.label_columns if c not in row]
    if missing:
        raise ValueError(f"label_columns {missing} are not columns of the dataset (it has {sorted(row)}).")
    dtypes = {}
    for name in cfg.label_columns:
        dtype = np.asarray(row[name]).dtype
        if dtype.kind not in "biuf" or np.asarray(row[name]).ndim:
            raise ValueError(
                f"label column {name!r} holds {row[name]!r}: only numeric scalars (ints, floats, bools) can be carried; map it to ids first."
            )
        dtypes[name] = "bool" if dtype.kind == "b" else ("float64" if dtype.kind == "f" else "int64")
    return dtypes


def _labeled_rows(
    dataset, column: InputColumn, *, model, cfg, context_size: int, special: SpecialTokens
) -> Iterator[tuple[torch.Tensor, dict]]:
    for row in dataset:
        value = row[column.name]
        if column.pretokenized:
            rows = truncate_pretokenized([value], context_size=context_size)
        else:
            sequence = next(_tokenize(iter([value]), model, chat=cfg.use_chat_formatting))
            rows = pack_sequences(
                [sequence],
                context_size=context_size,
                bos_token_id=special.bos,
                separator_token_id=None,
                disable_concat=True,
            )
        for tokens in rows:
            yield tokens, {name: row[name] for name in cfg.label_columns}


def special_token_ids(cfg: CacheActivationsRunnerConfig, tokenizer) -> list[int] | None:
    """Token ids whose positions are dropped (exclude_special_tokens), None when nothing is excluded."""
    if cfg.exclude_special_tokens is False:
        return None
    if isinstance(cfg.exclude_special_tokens, list):
        return sorted(set(cfg.exclude_special_tokens))
    if tokenizer is None:
        raise ValueError("exclude_special_tokens=True needs the model's tokenizer: give the token ids as a list.")
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
    return sorted({int(t) for t in (getattr(tokenizer, a, None) for a in attrs) if t is not None})


def _tokenize(values: Iterator[Any], model, *, chat: bool) -> Iterator[torch.Tensor]:
    """Tokenize raw rows one by one with the model's tokenizer (no BOS, no truncation), as SAELens does."""
    for value in values:
        if chat:
            conversation = [{"role": "user", "content": value}] if isinstance(value, str) else value
            ids = model.tokenizer.apply_chat_template(
                conversation, tokenize=True, return_tensors="pt", return_dict=False
            )
            yield ids[0]
        else:
            yield _text_tokens(model, value)


def _text_tokens(model, text: str) -> torch.Tensor:
    """`model.to_tokens(text, prepend_bos=False, truncate=False)` without touching the model's state.

    to_tokens sets model.cfg.default_prepend_bos for the duration of the call, and every forward pass
    saves and restores it: with forward passes on other threads (forward_threads) the two interleave
    and can leave the user's model with prepend_bos switched off. So the tokenizer is called directly.
    """
    ids = model.tokenizer(text, return_tensors="pt", padding=True, truncation=False)["input_ids"]
    if model.cfg.tokenizer_prepends_bos:
        ids = get_tokens_with_bos_removed(model.tokenizer, ids)
    return ids.squeeze(0)
