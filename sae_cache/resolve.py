"""What the model and the data tell a run, resolved once and checked before any pass over the data.

Owns `resolve(cfg, ...)`: open the dataset and read its first row (the column, the context size, the labels,
pretokenized ids against the vocabulary), load or adapt the model (hook names, widths from one probe pass,
the context length, `d_in`), the special tokens, the plan of every size, an early warning when raw text looks
too short, and how many forward passes run at once. Every failure here is a clear error before the first
forward pass over data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from sae_cache.adapters import adapt, load_model
from sae_cache.config import UNSET, CacheActivationsRunnerConfig
from sae_cache.data import (
    InputColumn,
    SpecialTokens,
    check_dataset_size,
    check_token_ids,
    find_column,
    first_row,
    label_dtypes,
    open_dataset,
    resolve_context_size,
    resolve_special_tokens,
    vocab_size,
)
from sae_cache.model import ModelAdapter
from sae_cache.plan import CachePlan, make_plan
from sae_cache.store import resolve_forward_threads


@dataclass
class Resolved:
    """What the model and the data told us, resolved once before any work."""

    model: ModelAdapter
    dataset: Any
    column: InputColumn
    special: SpecialTokens
    labels: dict[str, str]
    plan: CachePlan
    forward_threads: int


def resolve(
    cfg: CacheActivationsRunnerConfig, *, override_dataset: Any = None, model: Any = None, tokenizer: Any = None
) -> Resolved:
    """The run's model, data and plan (see the module docstring); `model`/`tokenizer` replace loading by name."""
    dataset = open_dataset(
        cfg.dataset_path,
        streaming=cfg.streaming,
        trust_remote_code=cfg.dataset_trust_remote_code,
        override=override_dataset,
    )
    row = first_row(dataset, dataset_path=None if override_dataset is not None else cfg.dataset_path)
    column = find_column(row, chat=cfg.use_chat_formatting)
    context_size = resolve_context_size(
        column,
        row,
        context_size=cfg.context_size,
        prepend_bos=cfg.prepend_bos,
        disable_concat=cfg.disable_concat_sequences,
    )
    adapter = adapt(model, tokenizer) if model is not None else _load(cfg)
    if column.pretokenized:
        check_token_ids(f"the pretokenized column {column.name!r}", row[column.name], vocab_size(adapter.tokenizer))
    special = resolve_special_tokens(
        adapter.tokenizer,
        prepend_bos=cfg.prepend_bos,
        sequence_separator_token=cfg.sequence_separator_token,
        exclude_special_tokens=cfg.exclude_special_tokens,
    )
    labels = label_dtypes(column, row, label_columns=cfg.label_columns, disable_concat=cfg.disable_concat_sequences)
    plan = _plan(cfg, adapter, context_size, labels)
    _warn_if_too_small(cfg, dataset, column, plan, adapter)
    threads = resolve_forward_threads(cfg.forward_threads, adapter.device)
    return Resolved(adapter, dataset, column, special, labels, plan, threads)


def _load(cfg: CacheActivationsRunnerConfig) -> ModelAdapter:
    return load_model(
        cfg.model_name,
        model_class_name=cfg.model_class_name,
        device=cfg.device,
        from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        compile_llm=cfg.compile_llm,
        compilation_mode=cfg.llm_compilation_mode,
    )


def config_plan(
    cfg: CacheActivationsRunnerConfig, hook_dims: dict[str, int], context_size: int, labels: dict | None = None
) -> CachePlan:
    """The plan of `cfg` once the model has told the hooks' widths (and the data its context size and labels)."""
    return make_plan(
        shuffle_across_sequences=cfg.shuffle_across_sequences,
        label_dtypes=labels,
        hook_dims=hook_dims,
        context_size=context_size,
        seqpos_slice=cfg.seqpos_slice,
        training_tokens=cfg.training_tokens,
        dtype=cfg.dtype,
        model_batch_size=cfg.model_batch_size,
        buffer_size_gb=cfg.buffer_size_gb,
        shuffle=cfg.shuffle,
    )


def _plan(cfg: CacheActivationsRunnerConfig, model: ModelAdapter, context_size: int, labels: dict) -> CachePlan:
    """The hooks checked against the model, their widths probed, and every size of the run."""
    model.check_hooks(cfg.hook_names)
    if model.n_ctx is not None and context_size > model.n_ctx:
        raise ValueError(
            f"context_size={context_size} exceeds the model's n_ctx={model.n_ctx}: set context_size <= {model.n_ctx}."
        )
    hook_dims = model.hook_dims(cfg.hook_names)
    wrong = {h: d for h, d in hook_dims.items() if d != cfg.d_in}
    if cfg.d_in != UNSET and wrong:
        raise ValueError(f"d_in={cfg.d_in} but the model's hooks have widths {wrong}: set d_in to match, or -1.")
    return config_plan(cfg, hook_dims, context_size, labels)


def _warn_if_too_small(cfg, dataset, column: InputColumn, plan: CachePlan, model: ModelAdapter) -> None:
    if cfg.use_chat_formatting:
        return
    warning = check_dataset_size(
        dataset, column, rows_needed=plan.n_rows, context_size=plan.context_size, tokenize=model.tokenize
    )
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=5)
