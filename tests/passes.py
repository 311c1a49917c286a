"""Forward passes over data, seen through a torch forward pre-hook on the model (a public seam, no patching).

A pass over data is any forward call but the runner's shape probe, which reads the hooks' widths from one
pass over a (1, n <= 5) batch of zeros before any data goes through the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_probe(tokens) -> bool:
    return isinstance(tokens, torch.Tensor) and tokens.shape[0] == 1 and tokens.shape[-1] <= 5 and not tokens.any()


@contextlib.contextmanager
def data_passes(model, *, fail: bool = False, interrupt_at: int | None = None) -> Iterator[list[tuple]]:
    """Record the shape of every forward pass over data; fail=True raises AssertionError at the first one,
    interrupt_at=n raises KeyboardInterrupt at the n-th (a user's Ctrl-C)."""
    seen: list[tuple] = []

    def pre_hook(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("input")
        if is_probe(tokens):
            return None
        seen.append(tuple(tokens.shape))
        if fail:
            raise AssertionError(f"a forward pass over data ran: tokens of shape {tuple(tokens.shape)}")
        if interrupt_at is not None and len(seen) == interrupt_at:
            raise KeyboardInterrupt
        return None

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
