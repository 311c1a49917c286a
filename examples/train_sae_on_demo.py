"""Train an SAE with SAELens from a sae_cache cache of the demo model, offline, and measure it.

    make demo                                   # writes activations/demo (shuffled on disk)
    .venv/bin/python examples/train_sae_on_demo.py [--cache activations/demo] [--tokens 400000]

SAELens reads the cache through `use_cached_activations=True, cached_activations_path=...` (its model is
never run). The script then evaluates the SAE on the cache's last rows, which training did not reach,
with sae_cache's reader: the fraction of variance explained and L0 (active latents per token). The same
SAE trained on the activations of a random, untrained model of the same shape is the baseline: a
trained model's activations have structure that a sparse dictionary captures; random ones much less so.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from transformer_lens import HookedTransformer

from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, CachedActivations
from sae_cache.demo import load_demo_dataset, load_demo_model

HOOK = "blocks.2.hook_resid_post"
CONTEXT = 128
EVAL_TOKENS = 32_768


def train(cache: Path, model, tokens: int, out: Path):
    reader = CachedActivations(cache)
    d_in = reader.d_in(HOOK)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_in, d_sae=8 * d_in, l1_coefficient=5.0, normalize_activations="expected_average_only_in"
        ),
        model_name="sae-cache/demo",
        hook_name=HOOK,
        dataset_path="sae-cache/demo-text",  # only peeked at: override_dataset is given, the cache is read
        is_dataset_tokenized=False,
        streaming=False,
        context_size=reader.sliced_context_size,
        use_cached_activations=True,
        cached_activations_path=str(cache),
        training_tokens=tokens,
        train_batch_size_tokens=1024,
        store_batch_size_prompts=16,
        n_batches_in_buffer=16,
        lr=4e-4,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(out / "checkpoints"),
        n_checkpoints=0,
        output_path=str(out / "sae"),
        verbose=False,
    )
    return LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=load_demo_dataset()).run()


@torch.no_grad()
def evaluate(sae, cache: Path) -> tuple[float, float]:
    """Explained variance and L0 on the last EVAL_TOKENS tokens of the cache."""
    reader = CachedActivations(cache)
    acts = torch.cat([a for a, _ in reader.batches(4096, hook=HOOK)])[-EVAL_TOKENS:].float()
    latents = sae.encode(acts)
    recon = sae.decode(latents)
    explained = 1 - (acts - recon).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    return float(explained), float((latents > 0).float().sum(-1).mean())


def cache_of(model, out: Path, tokens: int) -> Path:
    cfg = CacheActivationsRunnerConfig(
        hook_name=HOOK,
        context_size=CONTEXT,
        training_tokens=tokens,
        new_cached_activations_path=str(out),
        device="cpu",
        shuffle=True,
        buffer_size_gb=0.25,
    )
    CacheActivationsRunner(cfg, override_dataset=load_demo_dataset(), model=model).run()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=Path("activations/demo"), help="a cache of the demo model (make demo)"
    )
    parser.add_argument("--tokens", type=int, default=300_000, help="SAE training tokens (the cache must hold more)")
    args = parser.parse_args()
    torch.manual_seed(0)
    trained_model = load_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        needed = args.tokens + EVAL_TOKENS + 16 * CONTEXT * 16
        cache = args.cache if args.cache.exists() else cache_of(trained_model, tmp / "demo", needed)
        results = {"demo model (trained)": evaluate(train(cache, trained_model, args.tokens, tmp / "trained"), cache)}
        torch.manual_seed(1)
        random_cfg = copy.deepcopy(trained_model.cfg)
        random_cfg.init_weights = True  # the demo config skips init (its weights are loaded)
        random_model = HookedTransformer(random_cfg, tokenizer=trained_model.tokenizer)  # same shape, untrained
        random_model.eval()
        random_cache = cache_of(random_model, tmp / "random", needed)
        results["random model (baseline)"] = evaluate(
            train(random_cache, random_model, args.tokens, tmp / "random_sae"), random_cache
        )
    print(
        f"\nSAE d_sae = 8 x d_in on {HOOK}, {args.tokens:,} training tokens, "
        f"evaluated on {EVAL_TOKENS:,} held-out cached tokens\n"
    )
    print("| activations of | explained variance | L0 (active latents / token) |")
    print("|---|---|---|")
    for name, (ev, l0) in results.items():
        print(f"| {name} | {ev:.3f} | {l0:.1f} |")


if __name__ == "__main__":
    main()
