"""Turn token streams into fixed-length rows, exactly as SAELens does.

Owns the pure (no model, no I/O) part of input handling:

- resolving a special-token setting (``"bos" | "eos" | "sep" | int | None``) to a token id;
- packing raw-text token sequences into rows of ``context_size`` tokens, row for row identical to
  ``sae_lens.tokenization_and_batching.concat_and_batch_sequences`` (SAELens 6.x) called with
  ``begin_sequence_token_id=None``;
- cutting pretokenized rows to ``context_size``.

Sequences are handled as numpy int64 arrays and sliced, so the cost is per row, not per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from sae_cache.config import SPECIAL_TOKEN_NAMES

TokenSeq = Sequence[int] | torch.Tensor | np.ndarray


def resolve_special_token(spec: int | str | None, tokenizer, *, field: str) -> int | None:
    """Return the token id that ``spec`` (``"bos" | "eos" | "sep" | int | None``) names in ``tokenizer``."""
    if spec is None:
        return None
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise TypeError(f"{field} must be one of {SPECIAL_TOKEN_NAMES}, an int token id or None, got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"{field}={spec} is negative; token ids are >= 0")
        return spec
    if spec not in SPECIAL_TOKEN_NAMES:
        raise ValueError(f"{field}={spec!r} is not allowed; use one of {SPECIAL_TOKEN_NAMES}, an int token id or None")
    if tokenizer is None:
        raise ValueError(f"{field}={spec!r} needs a tokenizer to look it up; give {field} as an int token id or None")
    token_id = getattr(tokenizer, f"{spec}_token_id", None)
    if token_id is None:
        raise ValueError(
            f"{field}={spec!r} but the tokenizer has no {spec} token ({spec}_token_id is None); "
            f"set {field} to another of {SPECIAL_TOKEN_NAMES} the tokenizer has, an int token id, or None"
        )
    return int(token_id)


def _as_array(seq: TokenSeq) -> np.ndarray:
    """One token sequence as a 1-D int64 numpy array (a view where possible)."""
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    arr = np.asarray(seq, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"each token sequence must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def _to_row(pieces: list[np.ndarray]) -> torch.Tensor:
    """Concatenate row pieces into a new (never aliased) 1-D torch.long tensor."""
    return torch.from_numpy(np.concatenate(pieces))


def _pack_separate(
    seqs: Iterable[np.ndarray], *, context_size: int, bos_token_id: int | None
) -> Iterator[torch.Tensor]:
    """One row per sequence: BOS-prefixed and truncated; sequences too short for a full row are skipped."""
    for arr in seqs:
        if len(arr) == 0:
            continue
        # SAELens prepends BOS only when the result can fill a row (len >= context_size - 1).
        if bos_token_id is not None and len(arr) >= context_size - 1 and arr[0] != bos_token_id:
            yield _to_row([np.array([bos_token_id], dtype=np.int64), arr[: context_size - 1]])
        elif len(arr) >= context_size:
            yield _to_row([arr[:context_size]])


def _pack_concat(
    seqs: Iterable[np.ndarray], *, context_size: int, bos_token_id: int | None, separator_token_id: int | None
) -> Iterator[torch.Tensor]:
    """Concatenate sequences into rows; BOS opens each row, the separator joins sequences within a row.

    A row is started (BOS decision) or continued (separator decision) only ever at a sequence start or
    after a row was emitted, and the special token is skipped when the next token already is it.
    When the separator fills the last slot of a row, the sequence starts the next row (after BOS).
    """
    bos = None if bos_token_id is None else np.array([bos_token_id], dtype=np.int64)
    sep = None if separator_token_id is None else np.array([separator_token_id], dtype=np.int64)
    pieces: list[np.ndarray] = []
    filled = 0  # tokens in the partial row; 0 means no row is open
    for arr in seqs:
        offset = 0
        while offset < len(arr):
            if filled == 0:
                prefix = bos if bos is not None and arr[offset] != bos_token_id else None
            else:
                prefix = sep if sep is not None and arr[offset] != separator_token_id else None
            if prefix is not None:
                pieces.append(prefix)
                filled += 1
            take = context_size - filled
            pieces.append(arr[offset : offset + take])
            filled += len(pieces[-1])
            offset += take
            if filled == context_size:
                yield _to_row(pieces)
                pieces, filled = [], 0


def pack_sequences(
    token_seqs: Iterable[TokenSeq],
    *,
    context_size: int,
    bos_token_id: int | None,
    separator_token_id: int | None,
    disable_concat: bool = False,
) -> Iterator[torch.Tensor]:
    """Pack token sequences into 1-D torch.long rows of exactly ``context_size`` tokens.

    Yields the same rows in the same order as SAELens's ``concat_and_batch_sequences(token_seqs,
    context_size, begin_batch_token_id=bos_token_id, begin_sequence_token_id=None,
    sequence_separator_token_id=separator_token_id, disable_concat_sequences=disable_concat)``.
    ``bos_token_id`` is the BOS id when BOS should be prepended, else None. ``separator_token_id`` is
    ignored when ``disable_concat`` is set, as in SAELens.
    """
    if context_size <= 0:
        raise ValueError(f"context_size must be positive, got {context_size}")
    seqs = (_as_array(seq) for seq in token_seqs)
    if disable_concat:
        yield from _pack_separate(seqs, context_size=context_size, bos_token_id=bos_token_id)
        return
    if context_size == 1 and bos_token_id is not None:
        # SAELens then yields [BOS] rows forever once it meets a non-BOS token; we match it.
        warnings.warn(
            "context_size=1 with a BOS token gives rows that are only BOS (as in SAELens); "
            "raise context_size or turn off prepend_bos",
            stacklevel=2,
        )
    yield from _pack_concat(
        seqs, context_size=context_size, bos_token_id=bos_token_id, separator_token_id=separator_token_id
    )


def truncate_pretokenized(rows: Iterable[TokenSeq], *, context_size: int) -> Iterator[torch.Tensor]:
    """Cut pretokenized rows to their first ``context_size`` tokens (1-D torch.long).

    Unlike SAELens, which checks only the first row, every row must hold at least ``context_size``
    tokens: a short row would otherwise give a ragged batch later.
    """
    if context_size <= 0:
        raise ValueError(f"context_size must be positive, got {context_size}")
    for index, row in enumerate(rows):
        arr = _as_array(row)
        if len(arr) < context_size:
            raise ValueError(
                f"pretokenized row {index} has {len(arr)} tokens, fewer than context_size={context_size}; "
                f"lower context_size to at most {len(arr)} (pretokenized rows are never padded or joined)"
            )
        yield _to_row([arr[:context_size]])
