"""Per-hook statistics of the stored activations: count, mean, std, mean norm, max |x|, infs made by the cast.

Owns `HookStats`: per-item summaries computed on the model's device in one pass per batch, summed as
items are stored (on that device, by `RunningStats`, so that no forward pass waits for a copy to the host),
combined across ranks, and turned into the numbers a cache's metadata records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HookStats:
    """Running statistics of one hook's stored activations (computed in float32 before the cast)."""

    n_tokens: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    total_norm: float = 0.0
    max_abs: float = 0.0
    n_inf_after_cast: int = 0

    @staticmethod
    def per_item(acts: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Per stored item (a row, or a position): tokens, sum, sum of squares, sum of norms, max |x|, new infs."""
        flat = acts.float().reshape(acts.shape[0], -1, acts.shape[-1])
        norms = torch.linalg.vector_norm(flat, dim=-1)  # one pass over the values, no temporary of their size
        low, high = torch.aminmax(flat.reshape(flat.shape[0], -1), dim=1)
        if stored.dtype == torch.float16:
            new_inf = (torch.isinf(stored) & torch.isfinite(acts)).reshape(flat.shape[0], -1).sum(1).float()
        else:
            new_inf = torch.zeros(flat.shape[0], device=flat.device)
        return torch.stack(
            [
                torch.full((flat.shape[0],), flat.shape[1], dtype=torch.float32, device=flat.device),
                flat.sum((1, 2)),
                norms.square().sum(1),
                norms.sum(1),
                torch.maximum(low.abs(), high.abs()),
                new_inf,
            ],
            dim=1,
        ).double()

    @classmethod
    def combined(cls, raws: list[dict]) -> HookStats:
        """One HookStats from the raw fields of several (the ranks' parts of a cache)."""
        parts = [cls(**raw) for raw in raws]
        return cls(
            n_tokens=sum(p.n_tokens for p in parts),
            total=sum(p.total for p in parts),
            total_sq=sum(p.total_sq for p in parts),
            total_norm=sum(p.total_norm for p in parts),
            max_abs=max((p.max_abs for p in parts), default=0.0),
            n_inf_after_cast=sum(p.n_inf_after_cast for p in parts),
        )

    def to_dict(self, d: int) -> dict:
        """The numbers a cache's metadata records for a hook of width d."""
        n = max(self.n_tokens * d, 1)
        mean = self.total / n
        return {
            "tokens_seen": self.n_tokens,
            "mean": mean,
            "std": max(self.total_sq / n - mean * mean, 0.0) ** 0.5,
            "mean_norm": self.total_norm / max(self.n_tokens, 1),
            "max_abs": self.max_abs,
            "inf_after_cast": self.n_inf_after_cast,
        }


class RunningStats:
    """One hook's HookStats kept as float64 tensors on the model's device: items are added there, with no copy
    to the host, and the running numbers are read back once per piece (`state`, then `from_state`).

    The additions are the ones HookStats made on the host (per stored range of items, in float64), so the
    numbers are the same bit for bit.
    """

    def __init__(self, start: HookStats, device: torch.device) -> None:
        sums = [start.n_tokens, start.total, start.total_sq, start.total_norm, 0.0, start.n_inf_after_cast]
        self.sums = torch.tensor(sums, dtype=torch.float64, device=device)  # the per_item columns, summed
        self.max_abs = torch.tensor([start.max_abs], dtype=torch.float64, device=device)

    def add(self, items: torch.Tensor) -> None:
        """Add the per-item summaries (HookStats.per_item) of the items that were stored."""
        if not len(items):
            return
        self.sums += items.sum(0)
        self.max_abs = torch.fmax(self.max_abs, items[:, 4].max().reshape(1))  # fmax: a NaN row is skipped

    def state(self) -> torch.Tensor:
        """The running numbers as one new device tensor of 7 (read it with from_state)."""
        return torch.cat([self.sums, self.max_abs])

    @staticmethod
    def from_state(values: list[float]) -> HookStats:
        tokens, total, total_sq, total_norm, _, infs, max_abs = values
        return HookStats(int(tokens), total, total_sq, total_norm, max_abs, int(infs))
