"""TransformerLens models behind the model seam: hook names are the model's hook points (`blocks.3.hook_resid_post`).

Owns `TransformerLensAdapter` (a HookedTransformer or any HookedRootModule, and TransformerLens 3.9's
TransformerBridge, which keeps the same hook names, `hook_dict` and `stop_at_layer`), `load` by name (the bundled
demo model, or `HookedTransformer.from_pretrained_no_processing` as SAELens loads it), and `adapt` for a model object.
Hooks are added at a level of their own and only that level is removed after, so hooks the user put on the model
stay; the forward pass stops by itself after the deepest hooked block (`stop_at_layer`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from sae_cache.config import hook_layer_from_name
from sae_cache.model import ModelAdapter, Record, unknown_hooks_error

_LEVELS = itertools.count(2**40)  # hook levels of our own, far from TransformerLens's context levels (0, 1, ...)


class TransformerLensAdapter(ModelAdapter):
    """A TransformerLens HookedTransformer, HookedRootModule or TransformerBridge."""

    kind = "HookedTransformer"

    @property
    def device(self) -> torch.device:
        if hasattr(self.module, "W_E"):
            return self.module.W_E.device
        return super().device

    @property
    def n_ctx(self) -> int | None:
        return getattr(getattr(self.module, "cfg", None), "n_ctx", None)

    @property
    def causal(self) -> bool:
        return getattr(getattr(self.module, "cfg", None), "attention_dir", "causal") == "causal"

    @property
    def default_prepend_bos(self) -> bool:
        return getattr(getattr(self.module, "cfg", None), "default_prepend_bos", True)

    @property
    def name(self) -> str:
        return getattr(getattr(self.module, "cfg", None), "model_name", None) or super().name

    def tokenize(self, text: str) -> torch.Tensor:
        """`model.to_tokens(text, prepend_bos=False, truncate=False)` without touching the model's state.

        to_tokens sets model.cfg.default_prepend_bos for the duration of the call, and every forward pass
        saves and restores it: with forward passes on other threads (forward_threads) the two interleave
        and can leave the user's model with prepend_bos switched off. So the tokenizer is called directly.
        """
        from transformer_lens.utilities import get_tokens_with_bos_removed

        ids = self.tokenizer(text, return_tensors="pt", padding=True, truncation=False)["input_ids"]
        if self.module.cfg.tokenizer_prepends_bos:
            ids = get_tokens_with_bos_removed(self.tokenizer, ids)
        return ids.squeeze(0)

    def hook_names(self) -> list[str]:
        return list(self.module.hook_dict)

    def check_hooks(self, names: list[str]) -> None:
        missing = [h for h in names if h not in self.module.hook_dict]
        if missing:
            raise unknown_hooks_error(missing, self.hook_names(), "'blocks.0.hook_resid_post'")

    @contextlib.contextmanager
    def install(self, names: list[str], record: Record) -> Iterator[None]:
        level = next(_LEVELS)
        points = {self.module.hook_dict[name] for name in names}
        try:
            for name in names:  # the name is bound here: a TransformerBridge alias's hook point has another name
                self.module.hook_dict[name].add_hook(lambda act, hook, name=name: record(name, act), level=level)
            yield
        finally:
            for point in points:
                point.remove_hooks("fwd", level=level)

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


def adapt(model: Any, tokenizer: Any = None) -> TransformerLensAdapter | None:
    """The adapter of a TransformerLens model (its own tokenizer; `tokenizer` is not used), None for other models."""
    from transformer_lens import HookedRootModule

    kinds: tuple[type, ...] = (HookedRootModule,)
    try:
        from transformer_lens.model_bridge import TransformerBridge

        kinds += (TransformerBridge,)
    except ImportError:  # TransformerLens before 3 has no TransformerBridge
        pass
    if isinstance(getattr(model, "_orig_mod", model), kinds):
        return TransformerLensAdapter(model)
    return None


def load(model_name: str, *, device: str, from_pretrained_kwargs: dict) -> tuple[Any, None]:
    """The demo model by its own name, else `HookedTransformer.from_pretrained_no_processing` (as SAELens)."""
    from sae_cache.demo import DEMO_MODEL_NAME, load_demo_model

    if model_name == DEMO_MODEL_NAME:
        return load_demo_model(device=device), None
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained_no_processing(model_name, device=device, **from_pretrained_kwargs)
    except ValueError as e:  # a name it does not know: its message lists every model it knows (thousands of chars)
        if "Valid official model names" not in str(e):
            raise
        raise ValueError(
            f"model_name={model_name!r} is not a model TransformerLens knows: check the spelling (its names: "
            "transformer_lens.loading.OFFICIAL_MODEL_NAMES), or load the model yourself and pass "
            "CacheActivationsRunner(cfg, model=...)."
        ) from None
    return model, None
