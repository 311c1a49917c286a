"""The embedded demo: a small language model trained by this project and the public-domain text it learnt from.

Owns the bundled assets in ``sae_cache/demo/assets/`` and the two names that resolve to them offline:
``DEMO_MODEL_NAME`` loads a 4-layer ``HookedTransformer`` (``load_demo_model``) and ``DEMO_DATASET_NAME``
the English text it was trained on, one row per paragraph (``load_demo_dataset``). The assets are
written by ``scripts/train_demo_model.py``; ``docs/demo.md`` says where the text comes from.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

__all__ = ["DEMO_DATASET_NAME", "DEMO_MODEL_NAME", "load_demo_dataset", "load_demo_model"]

DEMO_MODEL_NAME = "sae-cache/demo"
DEMO_DATASET_NAME = "sae-cache/demo-text"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TEXT_FILE = "austen.txt.gz"


def load_demo_model(device: str = "cpu"):
    """Load the bundled demo model offline, in eval mode, with its tokenizer set (``<|bos|>`` is id 0).

    Returns a ``transformer_lens.HookedTransformer`` in float32 whose ``default_prepend_bos`` is True.
    """
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_cache.demo.tokenizer import wrap_tokenizer

    config = json.loads((ASSETS_DIR / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = HookedTransformerConfig(**config, device=device, init_weights=False)
    tokenizer = wrap_tokenizer(Tokenizer.from_file(str(ASSETS_DIR / TOKENIZER_FILE)))
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    state = {name: t.to(torch.float32) for name, t in load_file(ASSETS_DIR / WEIGHTS_FILE).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing_parameters = sorted({name for name, _ in model.named_parameters()} & set(missing))
    if unexpected or missing_parameters:
        raise RuntimeError(
            f"The bundled demo weights do not match its config (missing {missing_parameters}, "
            f"unexpected {sorted(unexpected)}); rerun scripts/train_demo_model.py to rewrite the assets."
        )
    return model.eval()


def _read_paragraphs() -> list[str]:
    """The bundled text as a list of paragraphs, in file order (the file separates them by blank lines)."""
    with gzip.open(ASSETS_DIR / TEXT_FILE, "rt", encoding="utf-8") as f:
        return [p.strip() for p in f.read().split("\n\n") if p.strip()]


def load_demo_dataset():
    """The bundled English text as a ``datasets.Dataset`` with one ``text`` column, one row per paragraph."""
    from datasets import Dataset

    return Dataset.from_dict({"text": _read_paragraphs()})
