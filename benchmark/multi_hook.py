"""Several hooks in one forward pass: four hooks against one, end to end (issue 6: at most 1.3x).

    python -m benchmark.multi_hook [--tokens 150000] [--reps 2] [--quick] [--device cuda]

Each run is a fresh process: a random 4-layer d_model=256 model (the demo model's shape), pretokenized
rows of 128 tokens, `CacheActivationsRunner` with shuffle=False. "1 hook" caches blocks.3.hook_resid_post;
"4 hooks" caches blocks.0..3.hook_resid_post in the same single forward pass (stopped after block 3 in
both cases), so the difference is the extra copies and four times the bytes written. The model, data and
plan are ready and one warm-up batch has run before the clock starts. Runs alternate (1, 4, 4, 1, ...)
and the best of each is reported.
"""

from __future__ import annotations

import os
import shutil

from benchmark._common import CONTEXT, Job, Verdict, alternate, entry, parse, parser, prepare_tokens, scratch, table
from benchmark._measure import Timed
from benchmark._setup import build_model, cache_config, load_rows, warm_up

ONE = ["blocks.3.hook_resid_post"]
FOUR = [f"blocks.{i}.hook_resid_post" for i in range(4)]
TARGET = 1.3
BATCH = 32
BUFFER_SIZE_GB = 0.25


def task_cache(data: str, out: str, tokens: int, hooks: list[str], device: str = "cpu") -> dict:
    """sae_cache on the random model with `hooks`, timing run() alone (the plan resolved before the clock)."""
    from sae_cache import CacheActivationsRunner

    model = build_model("random", device)
    rows = tokens // CONTEXT
    cfg = cache_config(
        out,
        hooks=hooks,
        training_tokens=rows * CONTEXT,
        batch=BATCH,
        context=CONTEXT,
        buffer_size_gb=BUFFER_SIZE_GB,
        device=device,
    )
    runner = CacheActivationsRunner(cfg, override_dataset=load_rows(data), model=model)
    _ = runner.plan  # resolve (model, data) before the clock starts
    warm_up(model, BATCH, CONTEXT, hooks, device)
    with Timed(device) as t:
        runner.run()
    shutil.rmtree(out)
    return t.result(tokens=rows * CONTEXT)


TASKS = {"cache": task_cache}


def measure(tokens: int, reps: int, device: str) -> dict[str, list[dict]]:
    with scratch("multi_hook") as tmp:
        data = prepare_tokens(tmp, tokens // CONTEXT)
        job = Job("multi_hook", "cache", dict(data=data["path"], out=str(tmp / "cache"), tokens=tokens, device=device))
        return alternate({"1": job.but(hooks=ONE), "4": job.but(hooks=FOUR)}, reps)


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument("--tokens", type=int, default=150_000, help="tokens per run (default 150,000)")
    args = parse(p, argv)
    tokens, reps = (8_192, 1) if args.quick else (args.tokens, args.reps or 2)
    runs = measure(tokens, reps, args.device)
    one, four = (min(r["seconds"] for r in runs[n]) for n in ("1", "4"))
    print(
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {tokens:,} tokens, context {CONTEXT}, "
        f"best of {reps}\n"
    )
    met = four / one <= TARGET
    table(
        ["hooks", "seconds", "tokens/s", "vs 1 hook", "target"],
        [
            [f"1 ({ONE[0]})", f"{one:.1f}", f"{tokens / one:,.0f}", "1.00", ""],
            [
                "4 (blocks.0-3.hook_resid_post)",
                f"{four:.1f}",
                f"{tokens / four:,.0f}",
                f"{four / one:.2f}",
                f"<= {TARGET} ({'met' if met else 'NOT met'})",
            ],
        ],
    )
    return [Verdict("6 four hooks / one hook time", f"{four / one:.2f}", f"<= {TARGET}", None if args.quick else met)]


if __name__ == "__main__":
    entry(main, TASKS)
