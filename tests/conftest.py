"""Shared offline fixtures: a tiny tokenizer trained in-process, a tiny random HookedTransformer, small datasets."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_cache import CacheActivationsRunnerConfig
from sae_cache.demo.tokenizer import train_bpe_tokenizer, wrap_tokenizer
from sae_cache.model import PROBE_SHAPE

torch.set_num_threads(1)  # tiny matmuls: threads only add contention

WORDS = (
    "the a sparse autoencoder learns features from activations of language models cached on disk "
    "researchers train many dictionaries one model pass shuffle rows seed buffer shard arrow token "
    "river mountain quickly slowly blue green seven eleven paris london because although"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Varied English-like sentences of different lengths (deterministic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "." for _ in range(n)]


ROW_BYTES = 16 * 32 * 4 + 16 * 4 + 17 * 4  # one row of the default hook: activations, token ids, offsets


def build_tokenizer():
    return wrap_tokenizer(train_bpe_tokenizer(make_texts(300, seed=1), vocab_size=300))


def build_model(tokenizer) -> HookedTransformer:
    """The tiny model: the same weights in every process (tests that spawn workers rebuild it)."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=64,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.eval()
    return model


SHAPE_PROBE = PROBE_SHAPE  # ModelAdapter.hook_dims: one pass over a batch of this shape, before any data


@contextlib.contextmanager
def data_passes(model, before: Callable[[int], None] | None = None) -> Iterator[list[str]]:
    """Watch the model's forward passes over data through a torch forward pre-hook on the model (the shape
    probe, told apart by its shape, is not one): yields the list of the threads that ran them, in order, and
    calls before(n) ahead of the n-th (counted from 1; it may raise to fail that pass). Removed on exit."""
    threads: list[str] = []
    lock = threading.Lock()

    def pre_hook(module, args):
        if tuple(args[0].shape) == SHAPE_PROBE:
            return
        with lock:
            threads.append(threading.current_thread().name)
            n = len(threads)
        if before is not None:
            before(n)

    handle = model.register_forward_pre_hook(pre_hook)
    try:
        yield threads
    finally:
        handle.remove()


def no_pass(count: int) -> None:
    """A `before` for data_passes: any pass over data is a test failure."""
    raise AssertionError(f"forward pass {count} over data ran")


def fail_at_pass(n: int, error: BaseException) -> Callable[[int], None]:
    """A `before` for data_passes: raise `error` ahead of the n-th pass over data."""

    def before(count: int) -> None:
        if count == n:
            raise error

    return before


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture(scope="session")
def text_dataset():
    return Dataset.from_dict({"text": make_texts(400)})


@pytest.fixture(scope="session")
def token_dataset():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(4, 300, (200, 24), generator=g).tolist()})


@pytest.fixture
def make_cfg(tmp_path):
    """A config for the tiny model with small sizes; keyword arguments override any field."""

    def make(**overrides) -> CacheActivationsRunnerConfig:
        fields = dict(
            dataset_path="unused-override-given",
            model_name="tiny",
            model_batch_size=5,
            hook_name="blocks.1.hook_resid_post",
            d_in=32,
            training_tokens=16 * 40,
            context_size=16,
            new_cached_activations_path=str(tmp_path / "cache"),
            shuffle=False,
            device="cpu",
            buffer_size_gb=10 * ROW_BYTES * 1.001 / 1e9,  # ten rows of one float32 hook per buffer
        )
        fields.update(overrides)
        return CacheActivationsRunnerConfig(**fields)

    return make
