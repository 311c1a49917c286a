"""The model seam: a language model of any supported library behind one interface (the only module that runs one).

Owns loading a model by name (`load_model`: TransformerLens, or the bundled demo model), wrapping a model a
user passes in (`adapt`), and everything the other stages ask of a model through `ModelAdapter`: its
tokenizer and how text becomes tokens (no BOS, no truncation, as SAELens does), the device its inputs go to,
its context length, its hook names and their widths (a five-token shape probe), and `HookCapture`: forward
passes that record several hooks and stop right after the deepest one, from one thread or several at once.
Hooks are added inside a context manager that removes them in `finally`, so a failed pass leaves the model
clean, and the model a user passed in comes back as it was.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sae_cache.config import hook_layer_from_name

Record = Callable[[str, torch.Tensor], None]  # called by an installed hook with (hook name, activation)


class _StopForward(Exception):
    """Raised by the last hook to fire, to end a forward pass the model cannot stop by itself."""


class ModelAdapter:
    """What sae_cache needs of a language model; one subclass per library."""

    kind = "model"

    def __init__(self, model: Any) -> None:
        self.model = model

    # -- what the model is ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        """The device input tokens go to (where the embedding lives)."""
        return next(self.model.parameters()).device

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
        return type(self.model).__name__

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
        """Raise a ValueError naming every hook the model does not have, with what its hooks look like."""
        raise NotImplementedError

    def hook_dims(self, names: list[str]) -> dict[str, int]:
        """Width of each hook's activation per position, from one forward pass over five tokens.

        Hooks with a head dimension (e.g. hook_z) are flattened to n_heads * d_head, as SAELens does. A hook
        whose activation is not laid out as (batch, position, ...) (attention patterns) is refused.
        """
        n = min(5, self.n_ctx or 5)
        tokens = torch.zeros((1, n), dtype=torch.long, device=self.device)
        with self.capture(names, flatten=False) as cap:
            acts = cap(tokens)
        dims = {}
        for hook in names:
            act = acts[hook]
            if act.ndim < 3 or act.shape[:2] != (1, n) or (act.ndim == 4 and act.shape[-2:] == (n, n)):
                raise ValueError(
                    f"hook {hook!r} gives activations of shape {tuple(act.shape)} for a (1, {n}) batch of tokens; "
                    "only hooks shaped (batch, position, ...) can be cached (not attention patterns or scores)."
                )
            dims[hook] = int(torch.tensor(act.shape[2:]).prod())
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


class TransformerLensAdapter(ModelAdapter):
    """A TransformerLens HookedTransformer (or any HookedRootModule): hook names are its hook points."""

    kind = "HookedTransformer"

    @property
    def device(self) -> torch.device:
        if hasattr(self.model, "W_E"):
            return self.model.W_E.device
        return super().device

    @property
    def n_ctx(self) -> int | None:
        return getattr(getattr(self.model, "cfg", None), "n_ctx", None)

    @property
    def causal(self) -> bool:
        return getattr(getattr(self.model, "cfg", None), "attention_dir", "causal") == "causal"

    @property
    def default_prepend_bos(self) -> bool:
        return getattr(getattr(self.model, "cfg", None), "default_prepend_bos", True)

    @property
    def name(self) -> str:
        return getattr(getattr(self.model, "cfg", None), "model_name", None) or super().name

    def tokenize(self, text: str) -> torch.Tensor:
        """`model.to_tokens(text, prepend_bos=False, truncate=False)` without touching the model's state.

        to_tokens sets model.cfg.default_prepend_bos for the duration of the call, and every forward pass
        saves and restores it: with forward passes on other threads (forward_threads) the two interleave
        and can leave the user's model with prepend_bos switched off. So the tokenizer is called directly.
        """
        from transformer_lens.utilities import get_tokens_with_bos_removed

        ids = self.tokenizer(text, return_tensors="pt", padding=True, truncation=False)["input_ids"]
        if self.model.cfg.tokenizer_prepends_bos:
            ids = get_tokens_with_bos_removed(self.tokenizer, ids)
        return ids.squeeze(0)

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def check_hooks(self, names: list[str]) -> None:
        missing = [h for h in names if h not in self.model.hook_dict]
        if not missing:
            return
        suffixes = sorted({name.split(".")[-1] for name in self.model.hook_dict})
        raise ValueError(
            f"hook_name {missing} not found in the model. Hook names look like 'blocks.0.hook_resid_post'; "
            f"this model has hooks ending in: {', '.join(suffixes)}."
        )

    @contextlib.contextmanager
    def install(self, names: list[str], record: Record) -> Iterator[None]:
        added = []  # (hook point, handle): only these are removed, never hooks the user had added
        try:
            for name in names:
                point = self.model.hook_dict[name]
                point.add_hook(lambda act, hook: record(hook.name, act), dir="fwd")
                added.append((point, point.fwd_hooks[-1]))
            yield
        finally:
            for point, handle in added:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)

    def stops_by_itself(self, names: list[str]) -> bool:
        return stop_layer(names) is not None

    def forward(self, tokens_BL: torch.Tensor, names: list[str], kwargs: dict) -> None:
        self.model(tokens_BL, stop_at_layer=stop_layer(names), **kwargs)


def stop_layer(hook_names: list[str]) -> int | None:
    """stop_at_layer for TransformerLens: one past the deepest block hooked, None if a hook is outside the blocks."""
    layers = [hook_layer_from_name(h) if h.startswith("blocks.") else None for h in hook_names]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[operator]


def adapt(model: Any) -> ModelAdapter:
    """The adapter of a model object a user passes in (an adapter is returned as it is)."""
    if isinstance(model, ModelAdapter):
        return model
    from transformer_lens.hook_points import HookedRootModule

    if isinstance(getattr(model, "_orig_mod", model), HookedRootModule):
        return TransformerLensAdapter(model)
    raise TypeError(
        f"model is a {type(model).__name__}: pass a TransformerLens HookedTransformer (or HookedRootModule)."
    )


def load_model(
    model_name: str,
    *,
    model_class_name: str = "HookedTransformer",
    device: str = "cpu",
    from_pretrained_kwargs: dict | None = None,
    compile_llm: bool = False,
    compilation_mode: str | None = None,
) -> ModelAdapter:
    """Load `model_name` onto `device` in eval mode (the demo model by its own name)."""
    from sae_cache.demo import DEMO_MODEL_NAME, load_demo_model

    if model_name == DEMO_MODEL_NAME:
        model = load_demo_model(device=device)
    else:
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(
            model_name, device=device, **(from_pretrained_kwargs or {})
        )
    model.eval()
    if compile_llm:
        model = torch.compile(model, mode=compilation_mode)
    return adapt(model)


class HookCapture:
    """Hooks installed on the model for as long as the block lasts; every thread captures its own pass.

    `with adapter.capture(hooks) as cap: acts = cap(tokens_BL)` runs one forward pass that records the
    hooks at the kept `positions` and stops after the deepest one. Hooks run on the thread that runs the
    pass, so what they record goes to that thread's own dict: several threads may run passes at once (the
    CPU forward threads of the store). Activations stay on the model's device, in the model's dtype.
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
        self._installed: contextlib.ExitStack | None = None

    def __enter__(self) -> HookCapture:
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(self.adapter.install(self.hook_names, self._record))
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._installed is not None
        self._installed.close()

    def _record(self, name: str, act: torch.Tensor) -> None:
        act = act[:, self.positions]
        captured = self._local.captured
        captured[name] = act.reshape(*act.shape[:2], -1) if self.flatten else act
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
