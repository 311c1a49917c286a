"""Throughput of N torchrun ranks against one process, on the same model and tokens (CPU, gloo).

    python -m benchmark.ranks_scaling [--tokens 200000] [--ranks 2] [--quick]

Each configuration runs `python -m torch.distributed.run --nproc_per_node N` on this file in worker
mode (a random 4-layer d_model=256 model built with the same seed on every rank, a pretokenized
random dataset, hook blocks.1.hook_resid_post, context 128), and the table reports the wall time of the
whole cache (including the consolidation on rank 0), tokens/s, and the ratio to one process.
On CPU the ranks share the machine's cores, so each rank gets cores // N threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark._random import CONTEXT


def _worker(out: str, tokens: int, threads: int) -> None:
    import torch

    from benchmark._random import demo_shaped_model, token_dataset
    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig, distributed

    torch.set_num_threads(threads)
    distributed.init_from_env("cpu")
    model = demo_shaped_model()
    data, rows = token_dataset(tokens)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="random",
        model_name="random",
        hook_name="blocks.1.hook_resid_post",
        context_size=CONTEXT,
        training_tokens=rows * CONTEXT,
        model_batch_size=32,
        new_cached_activations_path=out,
        shuffle=False,
        device="cpu",
        buffer_size_gb=0.25,
    )
    CacheActivationsRunner(cfg, override_dataset=data, model=model).run()


def _run(n_ranks: int, tokens: int, scratch: Path) -> float:
    out = scratch / f"ranks{n_ranks}"
    threads = max(1, (os.cpu_count() or 1) // n_ranks)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n_ranks),
        "--master_port",
        str(29500 + n_ranks),
        "-m",
        "benchmark.ranks_scaling",
        "--worker",
        str(out),
        "--tokens",
        str(tokens),
        "--threads",
        str(threads),
    ]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", metavar="OUT")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.tokens, args.threads)
        return
    tokens = 20_000 if args.quick else args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, tokens, Path(tmp))
        many = _run(args.ranks, tokens, Path(tmp))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {tokens:,} tokens, context {CONTEXT}\n")
    print("| processes | wall s (incl. start-up) | tokens/s | vs 1 process |")
    print("|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {tokens / one:,.0f} | 1.00 |")
    print(f"| {args.ranks} | {many:.1f} | {tokens / many:,.0f} | {one / many:.2f} |")


if __name__ == "__main__":
    main()
