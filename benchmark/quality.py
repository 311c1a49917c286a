"""What each storage format costs an SAE: SAELens trains the same SAE from float32, float16, bfloat16 and int8 caches.

    python -m benchmark.quality [--quick] [--train-tokens N] [--eval-tokens M] [--hook H] [--out DIR]

The demo model (sae_cache/demo) is cached once per format by `CacheActivationsRunner`: the same text, context,
seed and shuffle, so every cache holds the same tokens in the same order. Then:

1. each format's own error against the float32 cache, over every cached activation: relative L2
   (||decoded - float32|| / ||float32||) and the largest absolute error; with the 8-bit candidate that was
   not chosen (float8 e4m3 with one scale per token, absmax / 448, computed here from the float32 values);
2. SAELens trains one standard SAE per cache through `sae_cache.saelens.training_runner` (the same seed,
   hence the same initial weights and batch order, the same steps), reading the cache's first rows;
3. each SAE is evaluated on the float32 cache's last `--eval-tokens` tokens, which no training run read:
   explained variance, MSE per value, L0 (active latents per token) and dead latents (never active there).

Markdown tables on stdout (docs/quality.md shows them). Self-contained: it imports sae_cache and SAELens only.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.2.hook_resid_post"
CONTEXT = 128
FORMATS = ("float32", "float16", "bfloat16", "int8")
SEED = 42
EXPANSION = 8
BATCH_TOKENS = 1024
STORE_ROWS = 16  # SAELens's store_batch_size_prompts: cache rows read at a time
MIX_ROWS = 16  # SAELens's n_batches_in_buffer: its mixing buffer holds this many rows' tokens
NORM_BATCHES = 8  # batches SAELens reads to estimate the activation scale before training
ROWS_AT_ONCE = 256  # rows decoded at a time when measuring each format's error


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script works")
    parser.add_argument("--train-tokens", type=int, default=200_000, help="SAE training tokens per format")
    parser.add_argument("--eval-tokens", type=int, default=32_768, help="held-out float32 tokens to evaluate on")
    parser.add_argument("--hook", default=HOOK, help="the demo model's hook to cache and train on")
    parser.add_argument("--l1", type=float, default=5.0, help="the SAE's l1_coefficient")
    parser.add_argument("--out", type=Path, default=None, help="keep the caches and SAEs here (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.train_tokens, args.eval_tokens = 16_384, 4_096
    return args


def cache_rows(train_tokens: int, eval_tokens: int) -> tuple[int, int]:
    """Rows to cache, and the first held-out row: SAELens reads the norm estimate's and the training's tokens, its
    mixing buffer and one more group of rows at most, all before the held-out rows."""
    read = math.ceil((NORM_BATCHES * BATCH_TOKENS + train_tokens) / CONTEXT) + MIX_ROWS + 2 * STORE_ROWS
    return read + math.ceil(eval_tokens / CONTEXT), read


def make_caches(model, text, out: Path, hook: str, n_rows: int) -> dict[str, Path]:
    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

    caches = {}
    for name in FORMATS:
        caches[name] = out / f"cache-{name}"
        cfg = CacheActivationsRunnerConfig(
            hook_name=hook,
            context_size=CONTEXT,
            training_tokens=n_rows * CONTEXT,
            dtype=name,
            shuffle=True,
            seed=SEED,
            device="cpu",
            buffer_size_gb=0.25,
            new_cached_activations_path=str(caches[name]),
            overwrite=True,
        )
        started = time.perf_counter()
        CacheActivationsRunner(cfg, override_dataset=text, model=model).run()
        print(f"cached {name}: {n_rows * CONTEXT:,} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    return caches


def float8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit candidate not chosen: float8 e4m3 with one scale per token (max abs / 448), decoded."""
    scale = x.abs().amax(-1, keepdim=True) / 448
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def format_errors(caches: dict[str, Path], hook: str) -> tuple[dict[str, dict[str, float]], float]:
    """Relative L2 and max abs error of each format (and of float8 e4m3) against float32, over every cached value;
    and the mean over tokens of max abs / RMS (int8's step grows with it, float8's does not)."""
    from sae_cache import CachedActivations

    exact = CachedActivations(caches["float32"])
    readers = {name: CachedActivations(path) for name, path in caches.items() if name != "float32"}
    sums = {name: [0.0, 0.0] for name in [*readers, "float8_e4m3 (not stored)"]}
    total, peak_to_rms = 0.0, 0.0
    for start in range(0, len(exact), ROWS_AT_ONCE):
        stop = min(start + ROWS_AT_ONCE, len(exact))
        x = exact.rows(start, stop, hook=hook)[0]
        total += x.double().square().sum().item()
        peak_to_rms += (x.abs().amax(-1) / x.square().mean(-1).sqrt()).sum().item()
        decoded = {name: r.rows(start, stop, hook=hook)[0] for name, r in readers.items()}
        decoded["float8_e4m3 (not stored)"] = float8_e4m3(x)
        for name, values in decoded.items():
            error = (values - x).double()
            sums[name][0] += error.square().sum().item()
            sums[name][1] = max(sums[name][1], error.abs().max().item())
    errors = {"float32": {"relative_l2": 0.0, "max_abs": 0.0}}
    errors.update({n: {"relative_l2": math.sqrt(sq / total), "max_abs": mx} for n, (sq, mx) in sums.items()})
    return errors, peak_to_rms / exact.n_tokens


def train(cache: Path, model, text, hook: str, args, out: Path):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig

    from sae_cache import CachedActivations
    from sae_cache.saelens import training_runner

    d_in = CachedActivations(cache).d_in(hook)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_in, d_sae=EXPANSION * d_in, l1_coefficient=args.l1, normalize_activations="expected_average_only_in"
        ),
        model_name="sae-cache/demo",
        hook_name=hook,
        dataset_path="sae-cache/demo-text",  # override_dataset is given: only peeked at
        is_dataset_tokenized=False,
        streaming=False,
        context_size=CONTEXT,
        use_cached_activations=True,
        cached_activations_path=str(cache),
        training_tokens=args.train_tokens,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=STORE_ROWS,
        n_batches_in_buffer=MIX_ROWS,
        n_batches_for_norm_estimate=NORM_BATCHES,
        lr=4e-4,
        device="cpu",
        dtype="float32",
        seed=SEED,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(out / "checkpoints"),
        n_checkpoints=0,
        output_path=str(out / "sae"),
        verbose=False,
    )
    torch.manual_seed(SEED)  # the same initial weights and mixing order for every format
    return training_runner(cfg, override_model=model, override_dataset=text).run()


@torch.no_grad()
def evaluate(sae, acts: torch.Tensor) -> dict[str, float]:
    latents = sae.encode(acts)
    recon = sae.decode(latents)
    residual = (acts - recon).double().square().sum()
    active = latents > 0
    return {
        "explained_variance": 1 - (residual / (acts - acts.mean(0)).double().square().sum()).item(),
        "mse": (residual / acts.numel()).item(),
        "l0": active.float().sum(-1).mean().item(),
        "dead": int((~active.any(0)).sum()),
        "d_sae": latents.shape[-1],
    }


def bytes_per_token(cache: Path) -> float:
    import json

    meta = json.loads((cache / "sae_cache.json").read_text())
    return sum(p.stat().st_size for p in cache.glob("*.arrow")) / meta["n_tokens"]


def print_tables(args, errors, peak_to_rms, quality, disk) -> None:
    print(
        f"\n{args.hook} of the demo model (d_in 256), context {CONTEXT}; SAE d_sae = {EXPANSION} x d_in, standard "
        f"(l1 {args.l1}), {args.train_tokens:,} training tokens, evaluated on {args.eval_tokens:,} held-out float32 "
        f"tokens; max abs / RMS per token: {peak_to_rms:.2f} on average\n"
    )
    print("| format | bytes/token on disk | of float32 | relative L2 error | max abs error |")
    print("|---|---|---|---|---|")
    for name, err in errors.items():
        size = f"{disk[name]:.0f} | {disk[name] / disk['float32']:.3f}" if name in disk else "- | -"
        print(f"| {name} | {size} | {err['relative_l2']:.2e} | {err['max_abs']:.2e} |")
    print("\n| SAE trained from | explained variance | change vs float32 | MSE | L0 | dead latents |")
    print("|---|---|---|---|---|---|")
    base = quality["float32"]["explained_variance"]
    for name, q in quality.items():
        change = (q["explained_variance"] - base) / base
        print(
            f"| {name} | {q['explained_variance']:.4f} | {change:+.2%} | {q['mse']:.4e} | {q['l0']:.1f} | "
            f"{q['dead']} / {q['d_sae']} |"
        )


def main() -> None:
    args = parse()
    from sae_cache import CachedActivations
    from sae_cache.demo import load_demo_dataset, load_demo_model

    model, text = load_demo_model(), load_demo_dataset()
    n_rows, first_held_out = cache_rows(args.train_tokens, args.eval_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        caches = make_caches(model, text, out, args.hook, n_rows)
        errors, peak_to_rms = format_errors(caches, args.hook)
        held_out = CachedActivations(caches["float32"]).rows(first_held_out, n_rows, hook=args.hook)[0]
        held_out = held_out.reshape(-1, held_out.shape[-1])
        quality = {}
        for name, cache in caches.items():
            started = time.perf_counter()
            sae = train(cache, model, text, args.hook, args, out / f"sae-{name}")
            quality[name] = evaluate(sae, held_out)
            print(f"trained from {name} in {time.perf_counter() - started:.0f} s", flush=True)
        disk = {name: bytes_per_token(cache) for name, cache in caches.items()}
    print_tables(args, errors, peak_to_rms, quality, disk)


if __name__ == "__main__":
    main()
