"""Several hooks in one forward pass: four hooks against one, end to end (issue 6: at most 1.3x).

    python -m benchmark.multi_hook [--tokens 150000] [--reps 2] [--quick]

Each run is a fresh subprocess: a random 4-layer d_model=256 model (the demo model's shape), a
pretokenized random dataset, context 128, `CacheActivationsRunner` with shuffle=False. "1 hook" caches
blocks.3.hook_resid_post; "4 hooks" caches blocks.0..3.hook_resid_post in the same single forward pass
(stopped after block 3 in both cases), so the difference is the extra copies and four times the bytes
written. Runs alternate (1, 4, 4, 1, ...) and the best of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark._random import CONTEXT

ONE = ["blocks.3.hook_resid_post"]
FOUR = [f"blocks.{i}.hook_resid_post" for i in range(4)]


def _worker(out: str, tokens: int, hooks: list[str]) -> None:
    from benchmark._random import demo_shaped_model, token_dataset
    from sae_cache import CacheActivationsRunner, CacheActivationsRunnerConfig

    model = demo_shaped_model()
    data, rows = token_dataset(tokens)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="random",
        model_name="random",
        hook_name=hooks,
        context_size=CONTEXT,
        training_tokens=rows * CONTEXT,
        model_batch_size=32,
        new_cached_activations_path=out,
        shuffle=False,
        device="cpu",
        buffer_size_gb=0.25,
    )
    runner = CacheActivationsRunner(cfg, override_dataset=data, model=model)
    runner.plan  # resolve (model, data) before the clock starts
    started = time.perf_counter()
    runner.run()
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started}))


def _run(hooks: list[str], tokens: int, scratch: Path) -> float:
    out = scratch / f"hooks{len(hooks)}"
    cmd = [
        sys.executable,
        "-m",
        "benchmark.multi_hook",
        "--worker",
        str(out),
        "--tokens",
        str(tokens),
        "--hooks",
        ",".join(hooks),
    ]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    shutil.rmtree(out)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", metavar="OUT")
    parser.add_argument("--hooks", default="")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.tokens, args.hooks.split(","))
        return
    tokens, reps = (8_192, 1) if args.quick else (args.tokens, args.reps)
    times: dict[int, list[float]] = {1: [], 4: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for hooks in [ONE, FOUR] if rep % 2 == 0 else [FOUR, ONE]:
                times[len(hooks)].append(_run(hooks, tokens, Path(tmp)))
    one, four = min(times[1]), min(times[4])
    print(
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {tokens:,} tokens, context {CONTEXT}, best of {reps}\n"
    )
    print("| hooks | seconds | tokens/s | vs 1 hook | target |")
    print("|---|---|---|---|---|")
    print(f"| 1 ({ONE[0]}) | {one:.1f} | {tokens / one:,.0f} | 1.00 | |")
    verdict = "met" if four / one <= 1.3 else "NOT met"
    print(
        f"| 4 (blocks.0-3.hook_resid_post) | {four:.1f} | {tokens / four:,.0f} | {four / one:.2f} | <= 1.3 ({verdict}) |"
    )


if __name__ == "__main__":
    main()
