"""transformers models behind the model seam, run as SAELens's `AutoModelForCausalLM` path runs them (HookedProxyLM).

Owns `TransformersAdapter`: hook names are module paths (`transformer.h.1`, `model.layers.12`, `model.layers.12.mlp`,
`model.layers.0.self_attn`); a hook's activation is its module's output, or the output's first element when that is
a tuple, recorded by a torch forward hook that is always removed after. The pass runs with `use_cache=False` and
ends right after the deepest hooked module (HookCapture raises from the last hook to fire: nothing above it runs).
Input tokens go where the input embeddings live (a `device_map` may spread the rest over several devices), the
context length is the config's, and text is tokenized exactly as `HookedProxyLM.to_tokens` does. Also `load` (as
SAELens's `load_model("AutoModelForCausalLM", ...)`: `from_pretrained` with the user's keyword arguments, then to
`device` unless a `device_map` placed it, and `AutoTokenizer`) and `adapt` for a PreTrainedModel or a HookedProxyLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from sae_cache.model import ModelAdapter, Record, unknown_hooks_error

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")  # where configs keep n_ctx
TOKENIZER_KWARGS = (
    "revision",
    "trust_remote_code",
    "token",
    "cache_dir",
)  # from_pretrained kwargs the tokenizer shares


class TransformersAdapter(ModelAdapter):
    """A transformers PreTrainedModel (a causal LM, or its base model) and its tokenizer."""

    kind = "AutoModelForCausalLM"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def config(self) -> Any:
        """The model's (text) config."""
        return self.module.config.get_text_config()

    @property
    def device(self) -> torch.device:
        """Where the embeddings run: accelerate's execution device when a device_map offloads them (their weights
        then sit on the meta device), else their weights' device."""
        embeddings = self.module.get_input_embeddings()
        if embeddings is None:
            return super().device
        runs_on = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
        if runs_on is None:
            return embeddings.weight.device
        return torch.device("cuda", runs_on) if isinstance(runs_on, int) else torch.device(runs_on)  # int: a GPU

    @property
    def n_ctx(self) -> int | None:
        values = (getattr(self.config, field, None) for field in CONTEXT_FIELDS)
        return next((v for v in values if isinstance(v, int) and v > 0), None)

    @property
    def causal(self) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        config = self.config
        if getattr(config, "is_encoder_decoder", False):
            return False
        return getattr(config, "is_decoder", False) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    @property
    def default_prepend_bos(self) -> bool:
        return getattr(self.tokenizer, "bos_token_id", None) is not None

    @property
    def name(self) -> str:
        return getattr(self.module, "name_or_path", "") or super().name

    def tokenize(self, text: str) -> torch.Tensor:
        """What `HookedProxyLM.to_tokens(text, prepend_bos=False, truncate=False)` gives, as a 1-D tensor: the
        tokenizer's ids with its BOS removed when the tokenizer says it adds one (`add_bos_token`)."""
        from transformer_lens.utilities import get_tokens_with_bos_removed

        ids = self.tokenizer(text, return_tensors="pt", truncation=False, max_length=None)["input_ids"]
        if getattr(self.tokenizer, "add_bos_token", False):
            ids = get_tokens_with_bos_removed(self.tokenizer, ids)
        return ids.squeeze(0)

    def hook_names(self) -> list[str]:
        return [name for name, _ in self.module.named_modules() if name]

    def check_hooks(self, names: list[str]) -> None:
        modules = dict(self.module.named_modules())
        missing = [h for h in names if not h or h not in modules]
        if missing:
            raise unknown_hooks_error(missing, self.hook_names(), "module paths such as 'model.layers.0'")

    @contextlib.contextmanager
    def install(self, names: list[str], record: Record) -> Iterator[None]:
        modules = dict(self.module.named_modules())
        handles = []
        try:
            for name in names:
                handles.append(modules[name].register_forward_hook(_output_hook(name, record)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def stops_by_itself(self, names: list[str]) -> bool:
        """A model a device_map offloads (layers on "cpu" or "disk" beside others) runs its passes to the end: a pass
        ended by raising would skip accelerate's hooks that send an offloaded layer's weights back."""
        placed = {str(d) for d in (getattr(self.module, "hf_device_map", None) or {}).values()}
        return "disk" in placed or ("cpu" in placed and len(placed) > 1)

    def forward(self, tokens_BL: torch.Tensor, names: list[str], kwargs: dict) -> None:
        self.model(input_ids=tokens_BL, **{"use_cache": False, **kwargs})


def _output_hook(name: str, record: Record):
    """A torch forward hook recording the module's output, or its first element when the output is a tuple."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        record(name, output[0] if isinstance(output, tuple) and output else output)

    return hook


def adapt(model: Any, tokenizer: Any = None) -> TransformersAdapter | None:
    """The adapter of a transformers PreTrainedModel (with `tokenizer`, else the one found under its name or path)
    or of SAELens's HookedProxyLM (its model and tokenizer); None for other models."""
    from transformers import PreTrainedModel

    inner = getattr(model, "_orig_mod", model)
    if type(inner).__name__ == "HookedProxyLM" and isinstance(getattr(inner, "model", None), PreTrainedModel):
        return TransformersAdapter(inner.model, inner.tokenizer if tokenizer is None else tokenizer)
    if isinstance(inner, PreTrainedModel):
        return TransformersAdapter(model, find_tokenizer(inner) if tokenizer is None else tokenizer)
    return None


def find_tokenizer(model: Any, **kwargs) -> Any:
    """The tokenizer saved with a model, found under its name or path (AutoTokenizer)."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    if not path:
        raise ValueError(
            f"the {type(model).__name__} has no name or path to find its tokenizer under: pass "
            "CacheActivationsRunner(cfg, model=..., tokenizer=...)."
        )
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no tokenizer found for the model {path!r} ({' '.join(str(e).split())[:200]}): pass "
            "CacheActivationsRunner(cfg, model=..., tokenizer=...)."
        ) from None


def load(model_name: str, *, device: str, from_pretrained_kwargs: dict) -> tuple[Any, Any]:
    """`AutoModelForCausalLM.from_pretrained(model_name, **from_pretrained_kwargs)` on `device` (unless a device_map
    placed it), and its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_name, **from_pretrained_kwargs)
    if from_pretrained_kwargs.get("device_map") is None:
        model = model.to(device)
    shared = {k: v for k, v in from_pretrained_kwargs.items() if k in TOKENIZER_KWARGS}
    return model, find_tokenizer(model, **shared)
