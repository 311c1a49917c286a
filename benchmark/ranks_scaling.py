"""Throughput of N torchrun ranks against one process, on the same model and tokens (CPU, gloo).

    python -m benchmark.ranks_scaling [--tokens 200000] [--ranks 2] [--quick]

Each configuration runs `python -m torch.distributed.run --nproc_per_node N` on this module's `cache`
task (a random 4-layer d_model=256 model built with the same seed on every rank, pretokenized rows,
hook blocks.1.hook_resid_post, context 128; rank 0 prints the RESULT line), and the table reports the
wall time of the whole command (start-up and the consolidation on rank 0 included), tokens/s, and the
ratio to one process. On CPU the ranks share the machine's cores, so each rank gets cores // N threads
(--threads sets it).
"""

from __future__ import annotations

import os
import shutil
import sys

from benchmark._common import (
    CONTEXT,
    HOOK,
    THREADS_ENV,
    Verdict,
    entry,
    parse,
    parser,
    prepare_tokens,
    run_task,
    scratch,
    table,
)
from benchmark._measure import Timed
from benchmark._setup import build_model, cache_config, load_rows

BATCH = 32
BUFFER_SIZE_GB = 0.25


def task_cache(data: str, out: str, tokens: int) -> dict:
    """One rank's part of the cache (every rank runs this under torchrun), on the CPU."""
    from sae_cache import CacheActivationsRunner, distributed

    distributed.init_from_env("cpu")
    model = build_model("random")
    rows = tokens // CONTEXT
    cfg = cache_config(
        out,
        hooks=HOOK,
        training_tokens=rows * CONTEXT,
        batch=BATCH,
        context=CONTEXT,
        buffer_size_gb=BUFFER_SIZE_GB,
        device="cpu",
    )
    with Timed() as t:
        CacheActivationsRunner(cfg, override_dataset=load_rows(data), model=model).run()
    return t.result(tokens=rows * CONTEXT, world_size=int(os.environ.get("WORLD_SIZE", "1")))


TASKS = {"cache": task_cache}


def torchrun(n_ranks: int) -> list[str]:
    """The launcher of n_ranks processes on this machine, ending in -m (the module comes next)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_ranks)]
    return [*cmd, "--master_port", str(29500 + n_ranks), "-m"]


def run_ranks(n_ranks: int, data: dict, tokens: int, tmp, threads: int | None) -> float:
    """Wall seconds of the whole torchrun command (start-up included)."""
    threads = threads or max(1, (os.cpu_count() or 1) // n_ranks)
    out = tmp / f"ranks{n_ranks}"
    env = {THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads)}
    result = run_task(
        "ranks_scaling", "cache", launcher=torchrun(n_ranks), env=env, data=data["path"], out=str(out), tokens=tokens
    )
    shutil.rmtree(out)
    return result["wall_s"]


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200_000, help="tokens per run (default 200,000)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the second run (default 2)")
    args = parse(p, argv)
    tokens = 20_000 if args.quick else args.tokens
    with scratch("ranks") as tmp:
        data = prepare_tokens(tmp, tokens // CONTEXT)
        one = run_ranks(1, data, tokens, tmp, args.threads)
        many = run_ranks(args.ranks, data, tokens, tmp, args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {tokens:,} tokens, context {CONTEXT}\n")
    table(
        ["processes", "wall s (incl. start-up)", "tokens/s", "vs 1 process"],
        [
            [1, f"{one:.1f}", f"{tokens / one:,.0f}", "1.00"],
            [args.ranks, f"{many:.1f}", f"{tokens / many:,.0f}", f"{one / many:.2f}"],
        ],
    )
    return [Verdict(f"{args.ranks} ranks / 1 process tokens/s", f"{one / many:.2f}", "reported (no target)", None)]


if __name__ == "__main__":
    entry(main, TASKS)
