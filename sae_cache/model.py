"""Model loading and hooks: the only module that runs the language model.

Owns loading `cfg.model_name` (TransformerLens or the bundled demo model), checking hook names
against the model, finding each hook's width with a five-token shape probe, and `HookCapture`:
forward passes that record several hooks and stop after the deepest one, from one thread or several
at once. Hooks are added inside a context manager that removes them in `finally`, so a failed pass
leaves the model clean.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from sae_cache.config import CacheActivationsRunnerConfig, hook_layer_from_name


class _StopForward(Exception):
    """Raised by the last hook to end a forward pass that stop_at_layer cannot end."""


def load_model(cfg: CacheActivationsRunnerConfig) -> HookedRootModule:
    """Load the model named in the config onto cfg.device (the demo model by its own name)."""
    from sae_cache.demo import DEMO_MODEL_NAME, load_demo_model

    if cfg.model_name == DEMO_MODEL_NAME:
        model = load_demo_model(device=cfg.device)
    else:
        model = HookedTransformer.from_pretrained_no_processing(
            cfg.model_name, device=cfg.device, **cfg.model_from_pretrained_kwargs
        )
    model.eval()
    if cfg.compile_llm:
        model = torch.compile(model, mode=cfg.llm_compilation_mode)  # type: ignore[assignment]
    return model


def model_device(model: HookedRootModule) -> torch.device:
    """Device that input tokens must be on (where the embedding lives)."""
    if hasattr(model, "W_E"):
        return model.W_E.device
    return next(model.parameters()).device


def check_hook_names(model: HookedRootModule, hook_names: list[str]) -> None:
    """Raise a ValueError naming every hook the model does not have, with close alternatives."""
    missing = [h for h in hook_names if h not in model.hook_dict]
    if not missing:
        return
    suffixes = sorted({name.split(".")[-1] for name in model.hook_dict})
    raise ValueError(
        f"hook_name {missing} not found in the model. Hook names look like 'blocks.0.hook_resid_post'; "
        f"this model has hooks ending in: {', '.join(suffixes)}."
    )


def stop_layer(hook_names: list[str]) -> int | None:
    """stop_at_layer for TransformerLens: one past the deepest block hooked, None if a hook is outside the blocks."""
    layers = [hook_layer_from_name(h) if h.startswith("blocks.") else None for h in hook_names]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[operator]


def probe_hook_dims(model: HookedRootModule, hook_names: list[str]) -> dict[str, int]:
    """Width of each hook's activation per position, from a forward pass over a few tokens.

    Hooks with a head dimension (e.g. hook_z) are flattened to n_heads * d_head, as SAELens does. A hook
    whose activation is not laid out as (batch, position, ...) (attention patterns) is refused.
    """
    n = min(5, getattr(getattr(model, "cfg", None), "n_ctx", 5) or 5)
    tokens = torch.zeros((1, n), dtype=torch.long, device=model_device(model))
    acts = capture(model, tokens, hook_names, flatten=False)
    dims = {}
    for hook in hook_names:
        act = acts[hook]
        if act.ndim < 3 or act.shape[:2] != (1, n) or (act.ndim == 4 and act.shape[-2:] == (n, n)):
            raise ValueError(
                f"hook {hook!r} gives activations of shape {tuple(act.shape)} for a (1, {n}) batch of tokens; "
                "only hooks shaped (batch, position, ...) can be cached (not attention patterns or scores)."
            )
        dims[hook] = int(torch.tensor(act.shape[2:]).prod())
    return dims


class HookCapture:
    """Hooks installed on the model for as long as the block lasts; every thread captures its own pass.

    `with HookCapture(model, hooks) as cap: acts = cap(tokens_BL)` runs one forward pass that records
    the hooks at the kept `positions` and stops after the deepest one (stop_at_layer for block hooks,
    otherwise by raising from the last hook to fire). Hooks run on the thread that runs the pass, so
    what they record goes to that thread's own dict: several threads may run passes at once (the
    CPU forward threads of the store). Activations stay on the model's device, in the model's dtype.
    """

    def __init__(
        self,
        model: HookedRootModule,
        hook_names: list[str],
        *,
        positions: slice = slice(None),
        autocast: bool = False,
        model_kwargs: dict | None = None,
        flatten: bool = True,
    ) -> None:
        self.model, self.hook_names = model, list(hook_names)
        self.positions, self.autocast, self.flatten = positions, autocast, flatten
        self.model_kwargs = model_kwargs or {}
        self.stop = stop_layer(self.hook_names)
        self._local = threading.local()
        self._installed: contextlib.ExitStack | None = None

    def __enter__(self) -> HookCapture:
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(_hooks(self.model, [(h, self._save) for h in self.hook_names]))
        return self

    def __exit__(self, *exc) -> None:
        assert self._installed is not None
        self._installed.close()

    def _save(self, act: torch.Tensor, hook) -> None:
        act = act[:, self.positions]
        captured = self._local.captured
        captured[hook.name] = act.reshape(*act.shape[:2], -1) if self.flatten else act
        if self.stop is None and len(captured) == len(self.hook_names):
            raise _StopForward

    @torch.no_grad()
    def __call__(self, tokens_BL: torch.Tensor, model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """{hook: acts_BL...} of one forward pass over tokens_BL (on the model's device)."""
        self._local.captured = captured = {}
        device_type = model_device(self.model).type
        with (
            contextlib.suppress(_StopForward),
            torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            self.model(tokens_BL, stop_at_layer=self.stop, **{**self.model_kwargs, **(model_kwargs or {})})
        self._local.captured = None
        return captured


def capture(
    model: HookedRootModule, tokens_BL: torch.Tensor, hook_names: list[str], **options
) -> dict[str, torch.Tensor]:
    """One forward pass with the hooks installed just for it (options as for HookCapture)."""
    with HookCapture(model, hook_names, **options) as cap:
        return cap(tokens_BL)


@contextlib.contextmanager
def _hooks(model: HookedRootModule, fwd_hooks: list) -> Iterator[None]:
    """Add forward hooks for the duration of the block; always remove them."""
    try:
        for name, fn in fwd_hooks:
            model.hook_dict[name].add_hook(fn, dir="fwd")
        yield
    finally:
        model.reset_hooks(including_permanent=False)
