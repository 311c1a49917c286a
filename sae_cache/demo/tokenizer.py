"""Train a small byte-level BPE tokenizer in-process (no network) and wrap it for TransformerLens.

Owns the special-token layout shared by the embedded demo model and the test suite:
id 0 is ``<|bos|>``, 1 is ``<|eos|>``, 2 is ``<|pad|>``, 3 is ``<|sep|>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "sep_token": "<|sep|>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` with the four special tokens first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, name: str = "sae-cache-bpe") -> PreTrainedTokenizerFast:
    """Wrap a trained ``Tokenizer`` as the ``PreTrainedTokenizerFast`` that HookedTransformer expects.

    ``add_bos_token=True`` and a ``name_or_path`` keep TransformerLens from reloading the tokenizer
    from the Hub (it does so to get one that prepends BOS).
    """
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, name_or_path=name, add_bos_token=True, **SPECIAL_TOKENS)
