"""Tiny random transformers models for the tests: GPT-2, Llama and Gemma-2 shaped, each with a tokenizer trained
in-process, saved with save_pretrained to a directory that the tests load by path (as a user's checkpoint).

The tokenizers are those of the three kinds SAELens meets: GPT-2's adds no BOS; the Llama- and Gemma-shaped ones
put BOS first through their post-processor (as Llama 3's PreTrainedTokenizerFast does), which transformers 5
does not report as add_bos_token, so SAELens keeps that BOS in the token stream. `tokenizer_with_add_bos` is the
fourth: one that says add_bos_token=True, whose BOS SAELens removes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from sae_cache.demo.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

KINDS = ("gpt2", "llama", "gemma2")
D_MODEL = 32
N_CTX = 64
CONTEXT, BATCH, ROWS = 16, 5, 20  # the caches of the tests: rows of 16 tokens, batches of 5, 20 rows
# Per kind: a residual-stream block, an MLP and an attention module (the attention's output is a tuple).
HOOKS = {
    "gpt2": {"resid": "transformer.h.1", "mlp": "transformer.h.1.mlp", "attn": "transformer.h.0.attn"},
    "llama": {"resid": "model.layers.1", "mlp": "model.layers.1.mlp", "attn": "model.layers.0.self_attn"},
    "gemma2": {"resid": "model.layers.1", "mlp": "model.layers.1.mlp", "attn": "model.layers.0.self_attn"},
}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
LAST_BLOCK = {"gpt2": "transformer.h.2", "llama": "model.layers.2", "gemma2": "model.layers.2"}


def texts(n: int, seed: int = 0) -> list[str]:
    from conftest import make_texts

    return make_texts(n, seed=seed)


def build_tokenizer(*, bos_first: bool, add_bos_token: bool = False) -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE tokenizer (ids 0-3: bos, eos, pad, sep); BOS first when bos_first."""
    tokenizer = train_bpe_tokenizer(texts(300, seed=1), vocab_size=300)
    if bos_first:
        bos = SPECIAL_TOKENS["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    extra = {"add_bos_token": True} if add_bos_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS, **extra)


def tokenizer_with_add_bos(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A tokenizer that adds BOS and says so (add_bos_token=True): SAELens's to_tokens removes that BOS."""
    tokenizer = build_tokenizer(bos_first=False, add_bos_token=True)
    tokenizer.padding_side = padding_side
    return tokenizer


def model_config(kind: str, vocab_size: int):
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=N_CTX, n_embd=D_MODEL, n_layer=3, n_head=4, **special)
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        **special,
    )
    if kind == "llama":
        return LlamaConfig(**shape)
    return Gemma2Config(**shape, head_dim=8, sliding_window=8)  # contexts of 16 cross the sliding window


def save_model(kind: str, directory: Path) -> Path:
    """A tiny random `kind` model and its tokenizer saved to `directory` (the same weights every time)."""
    tokenizer = build_tokenizer(bos_first=kind != "gpt2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(kind, len(tokenizer)))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cache_options(model_dir: Path, out: Path, hooks, **overrides) -> dict:
    """CacheActivationsRunnerConfig fields that load the saved model by path (AutoModelForCausalLM) and cache ROWS rows
    of CONTEXT tokens, a few rows per buffer (several shards); `overrides` replace any field."""
    fields = dict(
        dataset_path="unused-override-given",
        model_name=str(model_dir),
        model_class_name="AutoModelForCausalLM",
        hook_name=hooks,
        training_tokens=CONTEXT * ROWS,
        context_size=CONTEXT,
        model_batch_size=BATCH,
        shuffle=False,
        device="cpu",
        new_cached_activations_path=str(out),
        buffer_size_gb=8 * CONTEXT * D_MODEL * 4 / 1e9,
    )
    return {**fields, **overrides}


def load(directory: Path, **kwargs):
    """The saved model, loaded by path as a user loads a checkpoint (eval mode)."""
    return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
