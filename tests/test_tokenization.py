"""Tests for sae_cache.tokenization: hand-written rules plus equivalence with SAELens's packer."""

from __future__ import annotations

import itertools
import random
import warnings

import numpy as np
import pytest
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from sae_cache.demo.tokenizer import train_bpe_tokenizer, wrap_tokenizer
from sae_cache.tokenization import (
    pack_sequences,
    resolve_special_token,
    truncate_pretokenized,
)

BOS, EOS, PAD, SEP = 0, 1, 2, 3


def pack(seqs, *, context_size, bos=None, sep=None, disable_concat=False, max_rows=1000) -> list[list[int]]:
    """Packed rows as lists, at most ``max_rows`` of them so that a broken packer cannot hang the suite."""
    rows = pack_sequences(
        seqs, context_size=context_size, bos_token_id=bos, separator_token_id=sep, disable_concat=disable_concat
    )
    return [row.tolist() for row in itertools.islice(rows, max_rows)]


# --- pack_sequences: concat mode -------------------------------------------------------------------


def test_plain_concatenation_drops_the_partial_last_row():
    seqs = [torch.arange(10, 15), torch.arange(15, 22)]
    assert pack(seqs, context_size=4) == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    assert pack([torch.arange(10, 17)], context_size=4) == [[10, 11, 12, 13]]


def test_rows_are_long_tensors_of_context_size_not_aliasing_the_input():
    seq = torch.arange(10, 30, dtype=torch.int32)
    rows = list(pack_sequences([seq], context_size=5, bos_token_id=None, separator_token_id=None))
    assert all(row.dtype == torch.long and row.shape == (5,) for row in rows)
    seq.zero_()
    assert rows[0].tolist() == [10, 11, 12, 13, 14]


def test_accepts_lists_numpy_and_tensors():
    seqs = [[10, 11], np.array([12, 13]), torch.tensor([14, 15])]
    assert pack(seqs, context_size=3) == [[10, 11, 12], [13, 14, 15]]


def test_bos_opens_every_row():
    assert pack([torch.arange(10, 18)], context_size=4, bos=BOS) == [[BOS, 10, 11, 12], [BOS, 13, 14, 15]]


def test_bos_not_duplicated_when_row_already_starts_with_it():
    # Row 2 starts at a BOS inside the sequence; BOS in the middle of a row is kept as is.
    seqs = [[10, 11, 12, BOS, 13, 14], [15]]
    assert pack(seqs, context_size=4, bos=BOS) == [[BOS, 10, 11, 12], [BOS, 13, 14, 15]]
    assert pack([[BOS, 10, 11, BOS, 12, 13, 14]], context_size=4, bos=BOS) == [[BOS, 10, 11, BOS], [BOS, 12, 13, 14]]


def test_separator_between_sequences_and_at_row_end():
    seqs = [[10, 11], [12, 13], [14], [15, 16, 17, 18]]
    assert pack(seqs, context_size=4, sep=EOS) == [[10, 11, EOS, 12], [13, EOS, 14, EOS], [15, 16, 17, 18]]


def test_separator_not_duplicated_when_sequence_starts_with_it():
    assert pack([[10, 11], [EOS, 12, 13]], context_size=4, sep=EOS) == [[10, 11, EOS, 12]]
    # SAELens's default: separator is BOS too.
    seqs = [[10, 11], [BOS, 12, 13, 14, 15]]
    assert pack(seqs, context_size=4, bos=BOS, sep=BOS) == [[BOS, 10, 11, BOS], [BOS, 12, 13, 14]]


def test_separator_filling_the_row_pushes_the_sequence_to_the_next_row():
    seqs = [[10, 11], [12, 13, 14]]
    assert pack(seqs, context_size=4, bos=BOS, sep=SEP) == [[BOS, 10, 11, SEP], [BOS, 12, 13, 14]]


def test_empty_sequences_are_skipped_without_extra_separators():
    assert pack([[], [10, 11], [], [12, 13], []], context_size=4, sep=SEP) == [[10, 11, SEP, 12]]
    assert pack([[], []], context_size=2, bos=BOS, sep=SEP) == []


def test_context_size_one_without_bos_ignores_separator():
    assert pack([[10, 11], [12]], context_size=1, sep=SEP) == [[10], [11], [12]]


def test_context_size_one_with_bos_gives_only_bos_rows_like_saelens():
    with pytest.warns(UserWarning, match="only BOS"):
        assert pack([[BOS, BOS]], context_size=1, bos=BOS) == [[BOS], [BOS]]
    with pytest.warns(UserWarning, match="only BOS"):
        assert pack([[10, 11]], context_size=1, bos=BOS, max_rows=5) == [[BOS]] * 5  # never ends, as in SAELens


def test_context_size_two():
    assert pack([[10], [11, 12]], context_size=2, bos=BOS, sep=SEP) == [[BOS, 10], [BOS, 11], [BOS, 12]]
    assert pack([[BOS], [11]], context_size=2, bos=BOS, sep=SEP) == [[BOS, SEP], [BOS, 11]]


def test_invalid_inputs():
    with pytest.raises(ValueError, match="context_size"):
        pack([[1, 2]], context_size=0)
    with pytest.raises(ValueError, match="1-D"):
        pack([torch.zeros(2, 3, dtype=torch.long)], context_size=2)


# --- pack_sequences: disable_concat ----------------------------------------------------------------


def test_disable_concat_with_bos():
    seqs = [
        [10, 11, 12],  # context_size - 1 tokens: BOS makes a full row
        [10, 11],  # too short even with BOS: skipped
        [BOS, 10, 11],  # already has BOS, too short: skipped
        [BOS, 10, 11, 12, 13],  # already has BOS: truncated
        [],
        list(range(10, 20)),
    ]
    expected = [[BOS, 10, 11, 12], [BOS, 10, 11, 12], [BOS, 10, 11, 12]]
    assert pack(seqs, context_size=4, bos=BOS, sep=SEP, disable_concat=True) == expected


def test_disable_concat_without_bos_skips_short_sequences_and_ignores_separator():
    seqs = [[10, 11, 12], [10, 11, 12, 13, 14], [], [20, 21, 22, 23]]
    assert pack(seqs, context_size=4, sep=SEP, disable_concat=True) == [[10, 11, 12, 13], [20, 21, 22, 23]]


# --- pack_sequences: equivalence with SAELens ------------------------------------------------------


def _random_stream(rng: random.Random, context_size: int) -> list[torch.Tensor]:
    seqs = []
    for _ in range(rng.randint(0, 12)):
        length = rng.choice([0, 1, 1, 2, rng.randint(0, 3 * context_size + 3)])
        seqs.append(torch.tensor([rng.randrange(6) for _ in range(length)], dtype=torch.long))
    return seqs


@pytest.mark.parametrize("context_size", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("disable_concat", [False, True])
@pytest.mark.parametrize("separator", [BOS, EOS, 4, None], ids=["sep=bos", "sep=eos", "sep=4", "sep=none"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_matches_saelens_concat_and_batch_sequences(context_size, disable_concat, separator, prepend_bos):
    rng = random.Random(f"{context_size}-{disable_concat}-{separator}-{prepend_bos}")
    bos = BOS if prepend_bos else None
    for _ in range(40):
        seqs = _random_stream(rng, context_size)
        # Bounded: SAELens never ends for context_size=1 with BOS once it meets a non-BOS token.
        limit = sum(len(s) for s in seqs) + 5
        expected = concat_and_batch_sequences(
            iter(seqs),
            context_size,
            begin_batch_token_id=bos,
            begin_sequence_token_id=None,
            sequence_separator_token_id=separator,
            disable_concat_sequences=disable_concat,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = pack_sequences(
                seqs,
                context_size=context_size,
                bos_token_id=bos,
                separator_token_id=separator,
                disable_concat=disable_concat,
            )
            actual_rows = [row.tolist() for row in itertools.islice(actual, limit)]
        assert actual_rows == [row.tolist() for row in itertools.islice(expected, limit)], [s.tolist() for s in seqs]


# --- resolve_special_token -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat", "a dog ran in the park", "tokens and more tokens"] * 5
    return wrap_tokenizer(train_bpe_tokenizer(texts, vocab_size=300))


class _NoSepTokenizer:
    bos_token_id = 5
    eos_token_id = 6
    sep_token_id = None


def test_resolve_named_tokens(tokenizer):
    assert resolve_special_token("bos", tokenizer, field="f") == BOS
    assert resolve_special_token("eos", tokenizer, field="f") == EOS
    assert resolve_special_token("sep", tokenizer, field="f") == SEP
    assert resolve_special_token("eos", _NoSepTokenizer(), field="f") == 6


def test_resolve_int_and_none_need_no_tokenizer(tokenizer):
    assert resolve_special_token(7, tokenizer, field="f") == 7
    assert resolve_special_token(7, None, field="f") == 7
    assert resolve_special_token(None, None, field="f") is None


def test_resolve_missing_token_names_the_field():
    with pytest.raises(ValueError, match=r"sequence_separator_token='sep'.*sep_token_id is None"):
        resolve_special_token("sep", _NoSepTokenizer(), field="sequence_separator_token")


def test_resolve_rejects_bad_specs(tokenizer):
    with pytest.raises(ValueError, match=r"my_field='pad'.*'bos', 'eos', 'sep'"):
        resolve_special_token("pad", tokenizer, field="my_field")
    with pytest.raises(ValueError, match="my_field.*needs a tokenizer"):
        resolve_special_token("bos", None, field="my_field")
    with pytest.raises(ValueError, match="my_field"):
        resolve_special_token(-1, tokenizer, field="my_field")
    with pytest.raises(TypeError, match="my_field"):
        resolve_special_token(True, tokenizer, field="my_field")


# --- truncate_pretokenized and sliced_length -------------------------------------------------------


def test_truncate_pretokenized_cuts_rows():
    rows = [torch.arange(10), [1, 2, 3, 4], np.arange(20, 26)]
    out = list(truncate_pretokenized(rows, context_size=4))
    assert [row.tolist() for row in out] == [[0, 1, 2, 3], [1, 2, 3, 4], [20, 21, 22, 23]]
    assert all(row.dtype == torch.long for row in out)


def test_truncate_pretokenized_short_first_row():
    with pytest.raises(ValueError, match=r"row 0 has 3 tokens.*context_size=8.*lower context_size to at most 3"):
        list(truncate_pretokenized([[1, 2, 3], list(range(10))], context_size=8))


def test_truncate_pretokenized_short_later_row_names_its_index():
    rows = truncate_pretokenized([list(range(10)), list(range(10)), [1]], context_size=4)
    assert len([next(rows), next(rows)]) == 2
    with pytest.raises(ValueError, match="row 2 has 1 tokens"):
        next(rows)
