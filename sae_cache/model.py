"""The model seam: a language model of any supported library behind one interface (the only module that runs one).

Owns `ModelAdapter`, everything the other stages ask of a model: its tokenizer and how text becomes tokens (no BOS,
no truncation, as SAELens does), the device its inputs go to, its context length, its hook names and their widths
(one shape probe over a (2, 5) batch of tokens), and `HookCapture`: forward passes that record several hooks and stop
right after the deepest one, from one thread or several at once. Hooks are added inside a context manager that
removes exactly the hooks it added in `finally`, and the model runs in eval mode for as long as they are in place,
so a model a user passed in comes back as it was (its own hooks, training flags and device untouched).

The adapters build on this module: `sae_cache.tl_model` for TransformerLens, `sae_cache.hf_model` for transformers;
`sae_cache.adapters` picks one for a model or a name.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

Record = Callable[[str, Any], None]  # called by an installed hook with (hook name, activation)
PROBE_SHAPE = (2, 5)  # the shape probe's batch of tokens: two rows (a hook must keep the batch), five positions


class _StopForward(Exception):
    """Raised by the last hook to fire, to end a forward pass the model cannot stop by itself."""


class ModelAdapter:
    """What sae_cache needs of a language model; one subclass per library."""

    kind = "model"

    def __init__(self, model: Any) -> None:
        self.model = model

    # -- what the model is ---------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        """The model's torch module (under torch.compile, the module it wraps): where hooks go."""
        return getattr(self.model, "_orig_mod", self.model)

    @property
    def compiled(self) -> bool:
        """Whether the model is torch.compile'd (its passes may replay CUDA graphs)."""
        return self.module is not self.model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        """The device input tokens go to (where the embedding lives)."""
        return next(self.module.parameters()).device

    @property
    def n_ctx(self) -> int | None:
        """The longest sequence the model takes, None when it has no limit we can read."""
        return None

    @property
    def causal(self) -> bool:
        """Whether attention is causal (right padding then cannot change the activations of real tokens)."""
        return True

    @property
    def default_prepend_bos(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return type(self.module).__name__

    # -- tokens --------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> torch.Tensor:
        """The 1-D token ids of `text`: no BOS added, no truncation."""
        raise NotImplementedError

    def tokenize_chat(self, conversation: list[dict]) -> torch.Tensor:
        """The 1-D token ids of a conversation formatted with the tokenizer's chat template."""
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, return_tensors="pt", return_dict=False)
        return ids[0]

    # -- hooks ---------------------------------------------------------------------------------------

    def hook_names(self) -> list[str]:
        """Every hook name of the model."""
        raise NotImplementedError

    def check_hooks(self, names: list[str]) -> None:
        """Raise a ValueError naming every hook the model does not have, with the close names it has."""
        raise NotImplementedError

    def probe(self, names: list[str]) -> dict[str, tuple[int | None, str]]:
        """(width per position, "") of each hook of `names`, or (None, why it cannot be cached), from one forward pass
        over a PROBE_SHAPE batch of tokens (fewer positions when the model's context is shorter)."""
        n = min(PROBE_SHAPE[1], self.n_ctx or PROBE_SHAPE[1])
        tokens = torch.zeros((PROBE_SHAPE[0], n), dtype=torch.long, device=self.device)
        with self.capture(names, flatten=False) as cap:
            acts = cap(tokens)
        return {name: activation_width(acts[name], n) if name in acts else (None, DID_NOT_RUN) for name in names}

    def hook_dims(self, names: list[str]) -> dict[str, int]:
        """Width of each hook's activation per position, from one probe pass (see `probe`).

        Hooks with a head dimension (e.g. hook_z) are flattened to n_heads * d_head, as SAELens does. A hook that
        does not run, or whose activation is not laid out as (batch, position, ...) (attention patterns), is refused.
        """
        dims = {}
        for hook, (width, why) in self.probe(names).items():
            if width is None:
                raise ValueError(f"hook {hook!r} {why}; only hooks shaped (batch, position, ...) can be cached.")
            dims[hook] = width
        return dims

    def capture(self, names: list[str], **options) -> HookCapture:
        """A HookCapture of `names` on this model (options as for HookCapture)."""
        return HookCapture(self, names, **options)

    def install(self, names: list[str], record: Record) -> contextlib.AbstractContextManager:
        """A context in which every hook of `names` calls record(name, activation) on each forward pass."""
        raise NotImplementedError

    def stops_by_itself(self, names: list[str]) -> bool:
        """Whether `forward` ends right after the deepest hook of `names` on its own; otherwise HookCapture
        ends the pass by raising from the last hook to fire."""
        return False

    def forward(self, tokens_BL: torch.Tensor, names: list[str], kwargs: dict) -> None:
        """One forward pass over tokens_BL, with the model's keyword arguments `kwargs`."""
        raise NotImplementedError


DID_NOT_RUN = "did not run in the forward pass (a container such as a ModuleList never runs itself)"


def activation_width(act: Any, n: int) -> tuple[int | None, str]:
    """(width per position, "") of a probe activation shaped (batch, position, ...), else (None, why not); `n` is
    the probe's number of positions."""
    if not isinstance(act, torch.Tensor):
        return None, f"gives a {type(act).__name__}, not a tensor"
    if act.ndim < 3 or act.shape[:2] != (PROBE_SHAPE[0], n) or (act.ndim == 4 and act.shape[-2:] == (n, n)):
        return None, (
            f"gives activations of shape {tuple(act.shape)} for a {(PROBE_SHAPE[0], n)} batch of tokens "
            "(not attention patterns or scores)"
        )
    return int(torch.tensor(act.shape[2:]).prod()), ""


def unknown_hooks_error(missing: list[str], known: list[str], looks_like: str) -> ValueError:
    """The one error for hook names the model lacks: what hook names look like, and the close ones it has."""
    close = {name: difflib.get_close_matches(name, known, n=5, cutoff=0.6) for name in missing}
    hints = "; ".join(f"for {name!r}: {', '.join(found)}" for name, found in close.items() if found)
    return ValueError(
        f"hook_name {missing} not found in the model. Hook names look like {looks_like}"
        + (f"; close names: {hints}" if hints else "")
        + ". `python -m sae_cache hooks MODEL` lists every hook name with its width."
    )


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode for the block; every submodule's own training flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class HookCapture:
    """Hooks installed on the model for as long as the block lasts; every thread captures its own pass.

    `with adapter.capture(hooks) as cap: acts = cap(tokens_BL)` runs one forward pass that records the
    hooks at the kept `positions` and stops after the deepest one. Hooks run on the thread that runs the
    pass, so what they record goes to that thread's own dict: several threads may run passes at once (the
    CPU forward threads of the store). Activations stay on the model's device (the input device: a hook on a
    layer a device_map put on another GPU is moved there), in the model's dtype.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        hook_names: list[str],
        *,
        positions: slice = slice(None),
        autocast: bool = False,
        model_kwargs: dict | None = None,
        flatten: bool = True,
    ) -> None:
        self.adapter, self.hook_names = adapter, list(hook_names)
        self.positions, self.autocast, self.flatten = positions, autocast, flatten
        self.model_kwargs = model_kwargs or {}
        self._raise_when_done = not adapter.stops_by_itself(self.hook_names)
        self._local = threading.local()
        self._device = adapter.device
        # A compiled model may replay CUDA graphs, whose outputs live in memory the next replay overwrites while the
        # copy to the host (on another stream) may still be reading them: keep copies of its activations instead.
        self._copy = adapter.compiled and self._device.type == "cuda"
        self._installed: contextlib.ExitStack | None = None

    def __enter__(self) -> HookCapture:
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(eval_mode(self.adapter.module))
        self._installed.enter_context(self.adapter.install(self.hook_names, self._record))
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._installed is not None
        self._installed.close()

    def _record(self, name: str, act: Any) -> None:
        if isinstance(act, torch.Tensor) and act.ndim >= 2:  # anything else is refused by hook_dims, before any data
            act = act if self.positions == slice(None) else act[:, self.positions]
            act = act if act.device == self._device else act.to(self._device)
            act = act.reshape(*act.shape[:2], -1) if self.flatten else act
            act = act.clone() if self._copy else act
        captured = self._local.captured
        captured[name] = act
        if self._raise_when_done and len(captured) == len(self.hook_names):
            raise _StopForward

    @torch.no_grad()
    def __call__(self, tokens_BL: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{hook: acts_BL...} of one forward pass over tokens_BL (on the model's device)."""
        self._local.captured = captured = {}
        kwargs = dict(self.model_kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        device_type = self.adapter.device.type
        with (
            contextlib.suppress(_StopForward),
            torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            self.adapter.forward(tokens_BL, self.hook_names, kwargs)
        self._local.captured = None
        return captured
