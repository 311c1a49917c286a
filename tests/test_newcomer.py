"""What a newcomer meets first works as written: `make demo` (no test extra), the quick start's numbers, `--help`
with defaults, and the SAELens script the run prints and docs/saelens.md's demo recipe, both executed on a small
demo cache made by the command `make demo` runs."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sae_cache import CacheActivationsRunnerConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "0"}


def make_dry_run(target: str, tmp_path: Path) -> list[str]:
    result = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_the_package_without_the_test_extra(tmp_path):
    demo = make_dry_run("demo", tmp_path)
    assert any(re.search(r"pip install -e \. ", line) for line in demo), demo
    assert not any("[test]" in line for line in demo), demo
    assert any("-m sae_cache --overwrite true --context_size 128" in line for line in demo), demo
    assert any(".[test]" in line for line in make_dry_run("test", tmp_path))  # CI: `make test` in a fresh venv


def test_the_quick_start_states_what_the_demo_caches():
    tokens = next(f.default for f in dataclasses.fields(CacheActivationsRunnerConfig) if f.name == "training_tokens")
    text = (DOCS / "quickstart.md").read_text()
    assert f"`training_tokens={tokens:_}` ({tokens // 128:,} rows of 128 tokens)" in text


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "-m", "sae_cache", "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for shown in (
        "(default: 500_000)",
        "(default: sae-cache/demo)",
        "(default: blocks.2.hook_resid_post)",
        "(default: cuda when available, else cpu)",
        "(default: 2.0)",
        "(default: none)",
        "(default: bos)",
        "(default: false)",
    ):
        assert shown in text, shown
    assert text.count("(default: ") == len(dataclasses.fields(CacheActivationsRunnerConfig))


def doc_recipe() -> str:
    text = (DOCS / "saelens.md").read_text()
    return text.split("<!-- demo-recipe:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_doc_recipe_is_what_make_demo_prints():
    """The numbers in docs/saelens.md are the ones the summary computes for the default demo cache."""
    from sae_cache.recipe import training_sizes

    default = CacheActivationsRunnerConfig(context_size=128, device="cpu")
    rows = default.training_tokens // 128
    batch, buffers, store_rows, tokens = training_sizes(rows, 128)
    recipe = doc_recipe()
    assert f"TRAINING_TOKENS = {tokens:_}" in recipe and f"{rows:,} rows" in recipe
    for setting in (f"train_batch_size_tokens={batch}", f"n_batches_in_buffer={buffers}"):
        assert setting in recipe
    assert f"store_batch_size_prompts={store_rows}" in recipe and 'CACHE = "activations/demo"' in recipe


def test_the_printed_script_and_the_doc_recipe_train_an_sae_as_written(tmp_path):
    """`make demo`'s command with 4,096 tokens, then its printed script verbatim, then the doc's recipe with
    TRAINING_TOKENS lowered to two batches (and its SAE saved beside the first); both from the directory `make demo`
    runs in."""
    pytest.importorskip("sae_lens")
    env = {**os.environ, **OFFLINE}
    command = [sys.executable, "-m", "sae_cache", "--overwrite", "true", "--context_size", "128"]
    command += ["--new_cached_activations_path", "activations/demo", "--training_tokens", "4096", "--device", "cpu"]
    made = subprocess.run([*command, "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    printed = made.stdout.split("\n\n", 1)[1]
    assert printed.startswith("from sae_lens import") and "override_model=load_demo_model()" in printed
    (tmp_path / "printed.py").write_text(printed)
    recipe = doc_recipe()
    (tmp_path / "doc.py").write_text(
        recipe.replace("TRAINING_TOKENS = 491_520", "TRAINING_TOKENS = 8_192").replace('-sae"', '-doc-sae"')
    )
    runner = "import runpy; runpy.run_path('printed.py'); runpy.run_path('doc.py')"
    trained = subprocess.run(
        [sys.executable, "-c", runner], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert trained.returncode == 0, trained.stderr[-5000:]
    from safetensors.torch import load_file

    for out in ("activations/demo-sae", "activations/demo-doc-sae"):
        weights = load_file(tmp_path / out / "sae_weights.safetensors")
        assert weights["W_enc"].shape == (256, 2048) and all(w.isfinite().all() for w in weights.values())


def test_the_printed_script_of_an_int8_cache_trains_through_the_adapter(tmp_path):
    """A compact cache's printed script goes through sae_cache.saelens.training_runner and runs as printed."""
    pytest.importorskip("sae_lens")
    env = {**os.environ, **OFFLINE}
    command = [sys.executable, "-m", "sae_cache", "--overwrite", "true", "--context_size", "128", "--dtype", "int8"]
    command += ["--new_cached_activations_path", "activations/int8", "--training_tokens", "4096", "--device", "cpu"]
    made = subprocess.run([*command, "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    printed = made.stdout.split("\n\n", 1)[1]
    assert "from sae_cache.saelens import training_runner" in printed and "sae = training_runner(cfg" in printed
    (tmp_path / "printed.py").write_text(printed)
    trained = subprocess.run(
        [sys.executable, "printed.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert trained.returncode == 0, trained.stderr[-5000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "activations/int8-sae" / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (256, 2048) and all(w.isfinite().all() for w in weights.values())
