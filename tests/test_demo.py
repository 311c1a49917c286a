"""The embedded demo model and text load offline, and the model is trained (not random)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_cache.demo import ASSETS_DIR, DEMO_DATASET_NAME, DEMO_MODEL_NAME, load_demo_dataset, load_demo_model

VALIDATION_EVERY = 20  # scripts/train_demo_model.py holds out paragraph i when i % 20 == 19


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def paragraphs():
    return list(load_demo_dataset()["text"])


def test_names():
    assert DEMO_MODEL_NAME == "sae-cache/demo"
    assert DEMO_DATASET_NAME == "sae-cache/demo-text"


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSETS_DIR.iterdir())
    assert total < 15 * 2**20, f"demo assets take {total / 2**20:.1f} MiB"


def test_config(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx) == (4, 256, 4, 64, 1024, 256)
    assert cfg.d_vocab == model.tokenizer.vocab_size == 4096
    assert cfg.default_prepend_bos
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "blocks.2.hook_resid_post" in model.hook_dict


def test_tokenizer_round_trips_and_special_ids(model):
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    text = "It is a truth universally acknowledged, that a single man -- 42 ünïcödé -- must be in want of a wife."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert model.to_tokens(text)[0].tolist() == [0, *ids]
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == ids


def test_model_is_trained_on_held_out_text(model, paragraphs):
    held_out = [p for i, p in enumerate(paragraphs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    stream = [
        i for p in held_out[:200] for i in [0, *model.tokenizer.encode(p, add_special_tokens=False)]
    ]  # the training layout
    rows = torch.cat([torch.zeros(4, 1, dtype=torch.long), torch.tensor(stream[: 4 * 255]).view(4, 255)], dim=1)
    with torch.no_grad():
        loss = model(rows, return_type="loss").item()
    assert loss < 0.6 * math.log(model.cfg.d_vocab), f"held-out loss {loss:.2f} is close to chance"


def test_run_with_cache_gives_default_hook(model):
    _, cache = model.run_with_cache(
        "Emma Woodhouse, handsome, clever, and rich.", names_filter="blocks.2.hook_resid_post"
    )
    acts = cache["blocks.2.hook_resid_post"]
    assert acts.shape[-1] == 256 and torch.isfinite(acts).all()


def test_dataset(paragraphs):
    dataset = load_demo_dataset()
    assert dataset.column_names == ["text"]
    assert len(dataset) > 5000
    assert all(isinstance(p, str) and p.strip() for p in paragraphs)
    assert sum(map(len, paragraphs)) > 2_000_000


def test_training_record_matches_assets():
    record = json.loads((ASSETS_DIR / "training.json").read_text())
    assert record["val_loss"] < 0.6 * record["ln_vocab"]
    assert record["args"]["steps"] >= 1000
