"""The docs cannot drift from the code: the generated configuration reference and the format contract."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from sae_cache import publish
from sae_cache.arrow_format import INFO_FILE, STATE_FILE
from sae_cache.columns import TOKEN_IDS
from sae_cache.config import CacheActivationsRunnerConfig
from sae_cache.metadata import METADATA_FILE, activations_metadata
from sae_cache.resolve import config_plan

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_generator():
    path = ROOT / "scripts" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _load_generator()


def test_configuration_reference_is_current(generator):
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == generator.render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_reference.py` and commit the result."
    )


def test_configuration_reference_lists_every_field(generator):
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(CacheActivationsRunnerConfig):
        assert f"| `{f.name}` |" in text, f"docs/configuration.md has no row for {f.name}"
        assert f"`--{f.name} " in text or f"`--{f.name}`" in text, f"docs/configuration.md has no flag for {f.name}"


def test_origins(generator):
    assert generator.origin("hook_layer") == "SAELens (older)"
    assert generator.origin("shuffle_across_sequences") == "SAELens PR #612"
    for own in ("overwrite", "resume", "fp16_overflow"):
        assert generator.origin(own) == "sae_cache"


def test_check_flag_exits_1_when_stale(generator, tmp_path):
    out = tmp_path / "configuration.md"
    assert generator.main(["--check", "--output", str(out)]) == 1  # missing
    out.write_text(generator.render() + "drift\n", encoding="utf-8")
    assert generator.main(["--check", "--output", str(out)]) == 1
    assert generator.main(["--output", str(out)]) == 0
    assert generator.main(["--check", "--output", str(out)]) == 0


def test_format_doc_names_the_layout():
    """docs/format.md names the files, columns and sibling directories the code uses, and every metadata key."""
    text = (DOCS / "format.md").read_text(encoding="utf-8")
    names = [INFO_FILE, STATE_FILE, METADATA_FILE, TOKEN_IDS, publish.WORK_SUFFIX, publish.BACKUP_SUFFIX]
    for name in names:
        assert name in text, f"docs/format.md does not mention {name}"
    cfg = CacheActivationsRunnerConfig(context_size=16, training_tokens=64, device="cpu")
    plan = config_plan(cfg, {"blocks.2.hook_resid_post": 8}, 16)
    metadata = activations_metadata(cfg, plan, stats={}, tokenizer=None)
    for key in metadata:
        assert f"`{key}`" in text, f"docs/format.md does not describe the metadata key {key!r}"
