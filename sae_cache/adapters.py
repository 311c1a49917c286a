"""Which adapter a model gets: `adapt` (a model object a user passes in) and `load_model` (by name).

`sae_cache.tl_model` serves TransformerLens (HookedTransformer, TransformerBridge, the bundled demo model) and
`sae_cache.hf_model` transformers (a PreTrainedModel, SAELens's HookedProxyLM). They are imported only when a model of
their kind is met, so importing sae_cache loads neither library.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_cache.config import MODEL_CLASSES
from sae_cache.model import ModelAdapter


def adapt(model: Any, tokenizer: Any = None) -> ModelAdapter:
    """The adapter of a model object a user passes in (an adapter is returned as it is).

    A transformers PreTrainedModel takes `tokenizer`, else the tokenizer found under its name or path; SAELens's
    HookedProxyLM brings its own; TransformerLens models (HookedTransformer, TransformerBridge) carry theirs.
    """
    if isinstance(model, ModelAdapter):
        return model
    from sae_cache import hf_model, tl_model

    for kind in (hf_model, tl_model):
        adapter = kind.adapt(model, tokenizer)
        if adapter is not None:
            return adapter
    raise TypeError(
        f"model is a {type(model).__name__}: pass a TransformerLens HookedTransformer or TransformerBridge, a "
        "transformers PreTrainedModel (e.g. from AutoModelForCausalLM), or SAELens's HookedProxyLM."
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
    """Load `model_name` as `model_class_name` says, in eval mode (on `device` unless a device_map places it)."""
    if model_class_name not in MODEL_CLASSES:
        raise ValueError(f"model_class_name={model_class_name!r} is not one of {list(MODEL_CLASSES)}.")
    from sae_cache import hf_model, tl_model

    kind = hf_model if model_class_name == "AutoModelForCausalLM" else tl_model
    model, tokenizer = kind.load(model_name, device=device, from_pretrained_kwargs=from_pretrained_kwargs or {})
    model.eval()
    if compile_llm:
        model = torch.compile(model, mode=compilation_mode)
    return adapt(model, tokenizer)
