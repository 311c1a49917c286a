"""The random model and token data that the torchrun and multi-hook benchmarks share (built the same in every process)."""

from __future__ import annotations

CONTEXT = 128


def demo_shaped_model():
    """A random HookedTransformer of the demo model's shape (4 layers, d_model 256), the same in every process."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(
        HookedTransformerConfig(
            n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=256, d_vocab=4096, act_fn="gelu", seed=0
        )
    )


def token_dataset(tokens: int):
    """A pretokenized dataset of random rows of CONTEXT tokens; returns (dataset, rows)."""
    import torch
    from datasets import Dataset

    rows = tokens // CONTEXT
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(0, 4096, (rows, CONTEXT), generator=g).tolist()}), rows
