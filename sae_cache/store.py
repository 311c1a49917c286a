"""The activations store: token rows in, buffers of activations out (compute only).

Owns batching token rows, one forward pass per batch (on a CPU model, `forward_threads` passes at
once on a thread pool, results taken in batch order, so the output does not depend on the thread
count), moving activations to host memory in the storage dtype, float16 overflow detection,
per-hook statistics, and cutting the stream into buffers of exactly `plan.rows_in_buffer(i)` rows,
each filled and handed on in pieces of at most `plan.rows_per_piece` rows (host memory holds a few
pieces, not whole buffers). With `exclude_token_ids`, the excluded tokens' positions are dropped and
the kept positions are packed into rows (only used when positions are later shuffled across
sequences). It knows nothing of files.

Every piece records where the stream goes on after it (`next_batch`, `next_skip`); a buffer's last
piece is the resume point, so a resumed run recomputes exactly the same batches and produces
identical bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from sae_cache.arrow_format import TOKEN_IDS
from sae_cache.model import HookCapture, model_device
from sae_cache.plan import CachePlan
from sae_cache.writer import Buffer, allocate_host_buffer


class Float16OverflowError(ValueError):
    """float16 storage would turn finite activations into inf."""


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
    def per_unit(acts: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Per stored unit (row or position): tokens, sum, sum of squares, sum of norms, max |x|, new infs."""
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

    def add(self, units: torch.Tensor) -> None:
        """Add the per-unit summaries of the units that were stored."""
        if not len(units):
            return
        tokens, total, total_sq, total_norm, _, infs = units.sum(0).tolist()
        self.n_tokens += int(tokens)
        self.total += total
        self.total_sq += total_sq
        self.total_norm += total_norm
        self.max_abs = max(self.max_abs, units[:, 4].max().item())
        self.n_inf_after_cast += int(infs)

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


@dataclass
class _Chunk:
    """Output units (rows, or kept positions) of one batch: acts still on the model's device."""

    batch: int
    acts: dict[str, torch.Tensor]  # hook -> [units, unit width], storage dtype
    tokens: torch.Tensor  # [units, tokens per unit], host
    unit_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [rows, 1], host


class ActivationsStore:
    """Turns token rows into host buffers of activations for the hooks of a plan."""

    def __init__(
        self,
        model,
        token_rows: Iterator[torch.Tensor],
        plan: CachePlan,
        *,
        batch_size: int,
        seqpos_slice: tuple[int | None, ...] = (None,),
        dtype: str = "float32",
        autocast: bool = False,
        model_kwargs: dict | None = None,
        exclude_token_ids: list[int] | None = None,
        fp16_overflow: str = "error",
        label_dtypes: dict[str, str] | None = None,
        forward_threads: int = 1,
    ) -> None:
        self.model = model
        self.forward_threads = forward_threads
        self.label_dtypes = label_dtypes or {}
        self.token_rows = token_rows
        self.plan = plan
        self.batch_size = batch_size
        self.positions = slice(*seqpos_slice)
        self.storage_dtype = getattr(torch, dtype)
        self.autocast = autocast
        self.model_kwargs = model_kwargs or {}
        self.exclude = None if exclude_token_ids is None else torch.tensor(sorted(exclude_token_ids))
        self.fp16_overflow = fp16_overflow
        self.hooks = list(plan.hook_dims)
        self.stats = {h: HookStats() for h in self.hooks}
        self.device = model_device(model)
        self.on_tokens: Callable[[int], None] = lambda n: None  # progress: tokens stored so far, per batch

    def restore_stats(self, raw: dict[str, dict]) -> None:
        """Continue the statistics of an interrupted run (raw HookStats fields per hook)."""
        self.stats.update({hook: HookStats(**fields) for hook, fields in raw.items()})

    def new_host_buffer(self) -> dict[str, torch.Tensor]:
        """Host tensors for one piece of a buffer, pinned when the model is on CUDA."""
        plan = self.plan
        pin = self.device.type == "cuda"
        return allocate_host_buffer(
            plan.hook_dims,
            plan.rows_per_piece,
            plan.sliced_context_size,
            self.storage_dtype,
            pin=pin,
            labels=self.label_dtypes,
        )

    def buffers(
        self,
        start_batch: int = 0,
        start_skip: int = 0,
        start_index: int = 0,
        acquire: Callable[[Callable[[], dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None,
    ) -> Iterator[Buffer]:
        """Yield the pieces of buffers start_index.. of the plan, in order (`first`/`last` mark a buffer's ends).

        The stream starts at batch start_batch, skipping start_skip units. `acquire(make)` supplies the
        host tensors to fill (a pool); by default each piece gets new ones.
        """
        acquire = acquire or (lambda make: make())
        chunks = self._chunks(start_batch)
        pending: list[_Chunk] = []
        skip = start_skip
        try:
            for index in range(start_index, self.plan.n_buffers):
                pieces = self.plan.pieces_of_buffer(index)
                for k, n_rows in enumerate(pieces):
                    piece = Buffer(
                        index, acquire(self.new_host_buffer), n_rows, first=k == 0, last=k == len(pieces) - 1
                    )
                    pending, skip = self._fill(piece, chunks, pending, skip)
                    piece.next_batch, piece.next_skip = (pending[0].batch, skip) if pending else (self._batches_done, 0)
                    yield piece
        finally:
            chunks.close()  # removes the hooks and restores torch's thread count now, not at garbage collection

    def _fill(self, buffer: Buffer, chunks: Iterator[_Chunk], pending: list[_Chunk], skip: int):
        """Copy buffer.n_rows rows from pending chunks, then new ones, into the buffer; return leftovers and skip."""
        dest = self._unit_views(buffer)
        units_needed = len(dest[TOKEN_IDS])
        got = 0
        while got < units_needed:
            if not pending:
                try:
                    pending.append(next(chunks))
                except StopIteration:
                    raise ValueError(
                        f"the dataset ran out while filling buffer {buffer.index} ({got} of {units_needed} units): "
                        "lower training_tokens or use a larger dataset."
                    ) from None
            chunk = pending[0]
            take = min(len(chunk.tokens) - skip, units_needed - got)
            self._copy(chunk, skip, skip + take, dest, got)
            got += take
            skip += take
            if skip == len(chunk.tokens):
                pending.pop(0)
                skip = 0
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the non-blocking copies have landed
        return pending, skip

    def _unit_views(self, buffer: Buffer) -> dict[str, torch.Tensor]:
        """The buffer's first n_rows rows seen as [units, unit width] (a unit is a row, or a position)."""
        per_row = self.plan.sliced_context_size if self.exclude is not None else 1
        units = buffer.n_rows * per_row
        return {name: t[: buffer.n_rows].view(units, -1) for name, t in buffer.tensors.items()}

    def _copy(self, chunk: _Chunk, start: int, stop: int, dest: dict[str, torch.Tensor], at: int) -> None:
        n = stop - start
        for hook in self.hooks:
            self.stats[hook].add(chunk.unit_stats[hook][start:stop])
            dest[hook][at : at + n].copy_(chunk.acts[hook][start:stop], non_blocking=True)
        dest[TOKEN_IDS][at : at + n].copy_(chunk.tokens[start:stop])
        self.on_tokens(dest[TOKEN_IDS][at : at + n].numel())
        for name, values in chunk.labels.items():
            dest[name][at : at + n].copy_(values[start:stop])

    def _chunks(self, start_batch: int) -> Iterator[_Chunk]:
        """Host chunks of every batch from start_batch on (rows, or kept positions when excluding), in batch order."""
        self._batches_done = start_batch
        capture = HookCapture(
            self.model, self.hooks, positions=self.positions, autocast=self.autocast, model_kwargs=self.model_kwargs
        )
        with capture, _torch_threads_split(self.forward_threads):
            for chunk in _ordered_map(
                lambda batch: self._compute(capture, *batch), self._batches(start_batch), self.forward_threads
            ):
                for hook in self.hooks:
                    self._check_overflow(hook, chunk.unit_stats[hook])
                self._batches_done = chunk.batch + 1
                yield chunk

    def _batches(self, start_batch: int) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """(batch index, tokens_BL, labels) of every batch from start_batch on, read on the calling thread."""
        rows = iter(self.token_rows)
        if start_batch:
            consumed = sum(1 for _ in itertools.islice(rows, start_batch * self.batch_size))
            if consumed < start_batch * self.batch_size:
                raise ValueError("the dataset is shorter than the part already cached: it changed since the first run.")
        # Without exclusion every batch gives batch_size rows: read no batch past the last one needed.
        last = math.ceil(self.plan.n_rows / self.batch_size) if self.exclude is None else None
        for batch_index in itertools.count(start_batch) if last is None else range(start_batch, last):
            batch = list(itertools.islice(rows, self.batch_size))
            if not batch:
                return
            labels = {}
            if self.label_dtypes:
                batch, label_rows = zip(*batch)
                labels = {
                    name: torch.tensor([r[name] for r in label_rows], dtype=getattr(torch, dtype)).view(-1, 1)
                    for name, dtype in self.label_dtypes.items()
                }
            yield batch_index, torch.stack(batch), labels

    @torch.no_grad()
    def _compute(
        self, capture: HookCapture, batch_index: int, tokens_BL: torch.Tensor, labels: dict[str, torch.Tensor]
    ) -> _Chunk:
        """One batch's forward pass, storage cast and per-unit statistics (may run on a forward thread)."""
        acts = capture(tokens_BL.to(self.device))
        tokens_BL = tokens_BL[:, self.positions]
        keep = None
        if self.exclude is not None:
            keep = ~torch.isin(tokens_BL.reshape(-1), self.exclude)
            tokens_BL = tokens_BL.reshape(-1)[keep]
        units = len(tokens_BL)
        chunk = _Chunk(batch=batch_index, acts={}, tokens=tokens_BL.reshape(units, -1).cpu(), labels=labels)
        for hook, act in acts.items():
            if keep is not None:
                act = act.reshape(-1, act.shape[-1])[keep.to(act.device)]
            stored = act.to(self.storage_dtype)
            chunk.unit_stats[hook] = HookStats.per_unit(act, stored).cpu()
            chunk.acts[hook] = stored.reshape(units, -1)
        return chunk

    def _check_overflow(self, hook: str, unit_stats: torch.Tensor) -> None:
        n_new_inf = int(unit_stats[:, 5].sum())
        if not n_new_inf:
            return
        message = (
            f"{n_new_inf} activations of hook {hook!r} exceed the float16 range (|x| > 65504) and became inf. "
            "Store in float32 (dtype='float32'), or set fp16_overflow='warn' to keep them as inf."
        )
        if self.fp16_overflow == "error":
            raise Float16OverflowError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def resolve_forward_threads(requested: int | None, device: torch.device) -> int:
    """Concurrent forward passes for a model on `device`: the requested number, or 2 on a multi-threaded CPU."""
    if requested is None:
        return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1
    if requested > 1 and device.type != "cpu":
        raise ValueError(
            f"forward_threads={requested} runs forward passes on threads, which helps only a model on the CPU; "
            f"this model is on {device}: leave forward_threads unset (or 1)."
        )
    return requested


def _ordered_map(fn: Callable, items: Iterator, threads: int) -> Iterator:
    """fn over items, results in item order; with threads > 1, that many calls run at once on a pool.

    Items are drawn on the calling thread, at most threads + 1 ahead of the results consumed. An
    exception in fn is raised here, at its item's turn; leaving early cancels what has not started
    and waits for what has.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sae_cache-forward") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@contextlib.contextmanager
def _torch_threads_split(n_forward: int) -> Iterator[None]:
    """Share torch's intra-op threads among n_forward concurrent forward passes; restore the count after."""
    before = torch.get_num_threads()
    if n_forward > 1:
        torch.set_num_threads(max(1, before // n_forward))
    try:
        yield
    finally:
        torch.set_num_threads(before)
