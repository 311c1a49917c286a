"""The activations store: token rows in, pieces of buffers of activations out (compute only).

Owns batching token rows, one forward pass per batch (on a CPU model, `forward_threads` passes at
once on a thread pool, results taken in batch order, so the output does not depend on the thread
count), encoding activations in the storage format on the model's device (sae_cache.storage_formats) and moving
them to host memory, float16 overflow detection,
per-hook statistics, and cutting the stream into buffers of exactly `plan.rows_in_buffer(i)` rows,
each filled and handed on in pieces of at most `plan.rows_per_piece` rows (host memory holds a few
pieces, not whole buffers). With `exclude_token_ids`, the excluded tokens' positions are dropped and
the kept positions are packed into rows (only used when positions are later shuffled across
sequences). Host memory is its own (`Piece`, `allocate_piece`); it knows nothing of files.

Nothing here waits for the GPU: token ids stay on the host (the exclusion mask is computed there), the
statistics are summed on the model's device (`RunningStats`), and on CUDA the activations are copied into the
pinned pieces on a separate stream. A piece is handed on with its copies possibly still in flight; whoever
writes it first calls `piece.finish()`, which waits for them (a CUDA event), reads the running statistics
once, and raises (or warns about) float16 overflow in that piece, before any of its bytes are written. So
consecutive forward passes are queued back to back while earlier pieces are copied and written.

Words: a *buffer* is `plan.rows_per_buffer` rows (one shard on disk, the unit of resuming); a *piece* is
the part of a buffer held in host memory at once; an *item* is what the stream is cut into, a row, or a
kept position when positions are excluded.

Every piece records where the stream goes on after it (`next_batch`, `next_skip`); a buffer's last
piece is the resume point, so a resumed run recomputes exactly the same batches and produces
identical bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_cache.columns import TOKEN_IDS
from sae_cache.model import HookCapture, ModelAdapter
from sae_cache.plan import CachePlan
from sae_cache.stats import HookStats, RunningStats
from sae_cache.storage_formats import storage_format


class Float16OverflowError(ValueError):
    """float16 storage would turn finite activations into inf."""


@dataclass
class Piece:
    """Rows of buffer `index` (all of it, or a part): host tensors (trimmed by n_rows), where the stream goes on."""

    index: int
    tensors: dict[str, torch.Tensor]
    n_rows: int
    first: bool = True  # the buffer's first piece: opens its shard
    last: bool = True  # the buffer's last piece: completes its shard
    next_batch: int = 0
    next_skip: int = 0
    finish: Callable[[], dict[str, HookStats]] = dict  # see `ActivationsStore._finish`; {} for a bare piece

    def columns(self):
        """numpy views of the filled rows (no copy)."""
        return {name: t[: self.n_rows].numpy() for name, t in self.tensors.items()}


def allocate_piece(
    hook_dims: dict[str, int],
    rows: int,
    sliced_context_size: int,
    dtype: str,
    *,
    pin: bool,
    labels: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Host tensors for one piece: each hook's stored columns in the storage format `dtype` ((rows, positions, d)
    values, (rows, positions) scales), (rows, positions) int32 token ids, (rows,) a label."""
    shape = (rows, sliced_context_size)
    tensors = {
        name: torch.empty((*shape, *per_position), dtype=getattr(torch, column_dtype), pin_memory=pin)
        for hook, d in hook_dims.items()
        for name, (per_position, column_dtype) in storage_format(dtype).columns(hook, d).items()
    }
    tensors[TOKEN_IDS] = torch.empty(shape, dtype=torch.int32, pin_memory=pin)
    tensors.update({name: torch.empty(rows, dtype=getattr(torch, kind)) for name, kind in (labels or {}).items()})
    return tensors


@dataclass
class _BatchItems:
    """The output items (rows, or kept positions) of one batch: activations still on the model's device."""

    batch: int
    acts: dict[str, torch.Tensor]  # stored column -> [items, item width], in the storage format
    tokens: torch.Tensor  # [items, tokens per item], host
    item_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> HookStats.per_item, on the device
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [rows, 1], host


class ActivationsStore:
    """Turns token rows into host pieces of buffers of activations for the hooks of a plan."""

    def __init__(
        self,
        model: ModelAdapter,
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
        self.storage = storage_format(dtype)
        self.autocast = autocast
        self.model_kwargs = model_kwargs or {}
        self.exclude = None if exclude_token_ids is None else torch.tensor(sorted(exclude_token_ids))
        self.fp16_overflow = fp16_overflow
        self.hooks = list(plan.hook_dims)
        self.device = model.device
        self.restore_stats({})
        # CUDA: device-to-host copies on their own stream, so that the next forward pass need not wait for them
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.on_tokens: Callable[[int], None] = lambda n: None  # progress: tokens stored so far, per batch

    def restore_stats(self, raw: dict[str, dict]) -> None:
        """Continue the statistics of an interrupted run (raw HookStats fields per hook; none: start from zero)."""
        start = {hook: HookStats(**raw[hook]) if hook in raw else HookStats() for hook in self.hooks}
        self.stats = {hook: RunningStats(st, self.device) for hook, st in start.items()}
        self._infs_checked = {hook: st.n_inf_after_cast for hook, st in start.items()}  # by `_finish`, in order

    def new_piece(self) -> dict[str, torch.Tensor]:
        """Host tensors for one piece of a buffer, pinned when the model is on CUDA."""
        plan = self.plan
        pin = self.device.type == "cuda"
        return allocate_piece(
            plan.hook_dims,
            plan.rows_per_piece,
            plan.sliced_context_size,
            self.storage.name,
            pin=pin,
            labels=self.label_dtypes,
        )

    def pieces(
        self,
        start_batch: int = 0,
        start_skip: int = 0,
        start_index: int = 0,
        acquire: Callable[[Callable[[], dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None,
    ) -> Iterator[Piece]:
        """Yield the pieces of buffers start_index.. of the plan, in order (`first`/`last` mark a buffer's ends).

        The stream starts at batch start_batch, skipping start_skip items. `acquire(make)` supplies the
        host tensors to fill (a pool); by default each piece gets new ones.
        """
        acquire = acquire or (lambda make: make())
        outputs = self._batch_items(start_batch)
        pending: list[_BatchItems] = []
        skip = start_skip
        try:
            for index in range(start_index, self.plan.n_buffers):
                pieces = self.plan.pieces_of_buffer(index)
                for k, n_rows in enumerate(pieces):
                    piece = Piece(index, acquire(self.new_piece), n_rows, first=k == 0, last=k == len(pieces) - 1)
                    pending, skip = self._fill(piece, outputs, pending, skip)
                    piece.next_batch, piece.next_skip = (pending[0].batch, skip) if pending else (self._batches_done, 0)
                    piece.finish = self._snapshot(piece.index)
                    yield piece
        finally:
            outputs.close()  # removes the hooks and restores torch's thread count now, not at garbage collection

    def _fill(self, piece: Piece, outputs: Iterator[_BatchItems], pending: list[_BatchItems], skip: int):
        """Copy piece.n_rows rows of items from pending batches, then new ones, into the piece; return the
        batches left over and how many items of the first of them are used."""
        dest = self._item_views(piece)
        items_needed = len(dest[TOKEN_IDS])
        got = 0
        while got < items_needed:
            if not pending:
                try:
                    pending.append(next(outputs))
                except StopIteration:
                    raise ValueError(
                        f"the dataset ran out while filling buffer {piece.index} ({got} of {items_needed} items): "
                        "lower training_tokens or use a larger dataset."
                    ) from None
            batch = pending[0]
            take = min(len(batch.tokens) - skip, items_needed - got)
            self._copy(batch, skip, skip + take, dest, got)
            got += take
            skip += take
            if skip == len(batch.tokens):
                pending.pop(0)
                skip = 0
        return pending, skip

    def _snapshot(self, index: int) -> Callable[[], dict[str, HookStats]]:
        """After a piece's copies are queued: its `finish` (the running statistics, copied to the host behind them)."""
        state = torch.stack([self.stats[hook].state() for hook in self.hooks])
        if self.copy_stream is None:
            return functools.partial(self._finish, index, state, None)
        host = torch.empty(state.shape, dtype=state.dtype, pin_memory=True)
        landed = torch.cuda.Event(blocking=True)  # the writer thread sleeps on it rather than spinning
        with _on_stream(self.copy_stream, self.device):  # behind the kernels that built `state`
            host.copy_(state, non_blocking=True)
            state.record_stream(self.copy_stream)
            self.copy_stream.record_event(landed)  # after every copy into the piece, and these statistics
        return functools.partial(self._finish, index, host, landed)

    def _finish(self, index: int, state: torch.Tensor, landed: Any) -> dict[str, HookStats]:
        """Wait until a piece's copies have landed; check it for float16 overflow; the running statistics at its end.

        Called once per piece, in order, by whoever writes the pieces (the writer thread), before writing it.
        """
        if landed is not None:
            landed.synchronize()
        stats = {hook: RunningStats.from_state(values) for hook, values in zip(self.hooks, state.tolist())}
        for hook, st in stats.items():
            new_infs, self._infs_checked[hook] = st.n_inf_after_cast - self._infs_checked[hook], st.n_inf_after_cast
            self._check_overflow(hook, new_infs, index)
        return stats

    def _item_views(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The piece's first n_rows rows seen as [items, item width] (an item is a row, or a position)."""
        per_row = self.plan.sliced_context_size if self.exclude is not None else 1
        items = piece.n_rows * per_row
        return {name: t[: piece.n_rows].view(items, -1) for name, t in piece.tensors.items()}

    def _copy(self, batch: _BatchItems, start: int, stop: int, dest: dict[str, torch.Tensor], at: int) -> None:
        n = stop - start
        for hook in self.hooks:
            self.stats[hook].add(batch.item_stats[hook][start:stop])
        with _on_stream(self.copy_stream, self.device):
            for name, values in batch.acts.items():
                source = values[start:stop]
                dest[name][at : at + n].copy_(source, non_blocking=True)
                if self.copy_stream is not None:
                    source.record_stream(self.copy_stream)  # its memory is not reused before the copy is done
        dest[TOKEN_IDS][at : at + n].copy_(batch.tokens[start:stop])
        self.on_tokens(dest[TOKEN_IDS][at : at + n].numel())
        for name, values in batch.labels.items():
            dest[name][at : at + n].copy_(values[start:stop])

    def _batch_items(self, start_batch: int) -> Iterator[_BatchItems]:
        """The output items of every batch from start_batch on (rows, or kept positions), in batch order."""
        self._batches_done = start_batch
        capture = self.model.capture(
            self.hooks, positions=self.positions, autocast=self.autocast, model_kwargs=self.model_kwargs
        )
        with capture, _torch_threads_split(self.forward_threads):
            for output in _ordered_map(
                lambda batch: self._compute(capture, *batch), self._batches(start_batch), self.forward_threads
            ):
                self._batches_done = output.batch + 1
                yield output

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
    ) -> _BatchItems:
        """One batch's forward pass, storage encoding and per-item statistics (may run on a forward thread).

        Nothing in it waits for the device: the tokens stay on the host (the kept positions are found there)."""
        acts = capture(_to_device(tokens_BL, self.device))
        tokens_BL = tokens_BL[:, self.positions]
        kept = None
        if self.exclude is not None:
            kept = torch.isin(tokens_BL.reshape(-1), self.exclude, invert=True).nonzero().squeeze(1)
            tokens_BL = tokens_BL.reshape(-1)[kept]
        n_items = len(tokens_BL)
        output = _BatchItems(batch=batch_index, acts={}, tokens=tokens_BL.reshape(n_items, -1), labels=labels)
        for hook, act in acts.items():
            if kept is not None:
                act = act.reshape(-1, act.shape[-1]).index_select(0, _to_device(kept, act.device))
            stored = self.storage.encode(hook, act)  # on the model's device, before the copy to host
            output.item_stats[hook] = HookStats.per_item(act, stored[self.storage.values_column(hook)])
            output.acts.update({name: values.reshape(n_items, -1) for name, values in stored.items()})
        return output

    def _check_overflow(self, hook: str, n_new_inf: int, index: int) -> None:
        if not n_new_inf:
            return
        message = (
            f"{n_new_inf} activations of hook {hook!r} in buffer {index} exceed the float16 range (|x| > 65504) and "
            "became inf. Store in float32 (dtype='float32'), or set fp16_overflow='warn' to keep them as inf."
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


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory, so the copy does not make the host wait."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def _on_stream(stream: Any, device: torch.device) -> Iterator[None]:
    """Work queued in the block goes to `stream` (after what the current stream has queued), or nowhere special
    when stream is None (a CPU model)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


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
