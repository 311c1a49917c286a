"""Where a target substring sits in a tokenized prompt: pure functions, no model and no I/O.

Owns turning (prompt, target) pairs into the token positions that position-targeted caching reads:
each token's character span (a fast tokenizer's offsets, or decoding growing prefixes for a slow
one), the token span of the first or last occurrence of the target (every token sharing a character
with it, whatever the tokenizer splits), its last `n_positions` tokens (left-padded with -1 when the
span is shorter, or skipped), and the BOS shift. Skipped rows are counted by reason and never kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocatedPrompt:
    """One kept prompt: its input row, its tokens and the positions to cache (-1 marks padding)."""

    source_index: int
    token_ids: np.ndarray
    positions: np.ndarray

    @property
    def forward_length(self) -> int:
        """Tokens the forward pass needs: causal attention makes later tokens irrelevant to the cached ones."""
        return int(self.positions.max()) + 1


def find_target(text: str, target: str, occurrence: str) -> tuple[int, int] | None:
    """Character span [start, end) of the first or last occurrence of `target` in `text`; None if absent or empty."""
    start = text.find(target) if occurrence == "first" else text.rfind(target)
    return None if not target or start < 0 else (start, start + len(target))


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], str]:
    """Token ids of `text` (no special tokens), each token's character span, and the text the spans index.

    Fast tokenizers give the spans in `text` itself. Otherwise they come from decoding growing prefixes
    (a token that leaves a character unfinished spans that character) and index the decoded text.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    offsets, done = [], 0
    for n in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:n], clean_up_tokenization_spaces=False)
        finished = max(done, len(prefix.rstrip("\ufffd")))
        offsets.append((done, finished + (finished < len(prefix))))
        done = finished
    return ids, offsets, tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Token indices [first, last + 1) of the tokens sharing a character with [start, end) (zero-width tokens never)."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < e and s < end and e > start]
    return (hits[0], hits[-1] + 1) if hits else None


def span_positions(span: tuple[int, int], n_positions: int, short_span: str) -> np.ndarray | None:
    """The last n_positions token indices of `span`, left-padded with -1 when it is shorter ("pad") or None ("skip")."""
    first = max(span[0], span[1] - n_positions)
    kept = np.arange(first, span[1], dtype=np.int64)
    if len(kept) < n_positions and short_span == "skip":
        return None
    return np.concatenate([np.full(n_positions - len(kept), -1, dtype=np.int64), kept])


def locate_prompts(
    prompts: list[str],
    targets: list[str],
    tokenizer,
    *,
    occurrence: str,
    n_positions: int,
    short_span: str,
    bos_token_id: int | None,
    n_ctx: int | None,
) -> tuple[list[LocatedPrompt], Counter]:
    """Tokenize every prompt and find its cached positions; skipped rows are counted by reason, never kept."""
    counts: Counter = Counter()
    located = []
    prefix = [] if bos_token_id is None else [bos_token_id]
    for index, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        ids, offsets, text = token_offsets(tokenizer, prompt or "")
        chars = find_target(text, target or "", occurrence)
        span = None if chars is None else token_span(offsets, *chars)
        if span is None:
            counts["not_found"] += 1
            continue
        counts["multiple_occurrences"] += text.find(target, text.find(target) + 1) >= 0
        positions = span_positions((span[0] + len(prefix), span[1] + len(prefix)), n_positions, short_span)
        if positions is None:
            counts["short_span"] += 1
        elif n_ctx is not None and positions.max() >= n_ctx:
            counts["beyond_context"] += 1
        else:
            located.append(LocatedPrompt(index, np.asarray(prefix + ids, dtype=np.int32), positions))
    return located, counts
