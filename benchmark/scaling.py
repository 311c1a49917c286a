"""(e) Scaling: sae_cache end to end on 1x and 4x the tokens, same buffer size.

    python -m benchmark.scaling [--quick] [--reps N] [--rows R] [--buffer-mib M] [--shuffle] [--device cuda]

Runs `CacheActivationsRunner` (shuffle=False unless --shuffle) on R rows and on 4R rows of 128
tokens with 64 MiB buffers, alternating, best of N (the sae_cache task of benchmark.forward_vs_cache).
Target (issue 3, 1e): 4x the tokens takes about 4x the time (we check 3.4x-4.6x) and the peak RSS
stays flat (4x run within 10% + 64 MiB of the 1x).
"""

from __future__ import annotations

from benchmark import forward_vs_cache
from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    HOOK,
    MiB,
    Verdict,
    alternate,
    best,
    entry,
    f0,
    f2,
    f3,
    header,
    parse,
    parser,
    prepare_tokens,
    scratch,
    table,
    threads_text,
    times,
)

COLUMNS = [
    "run",
    "tokens",
    "buffers",
    "best s",
    "all runs s",
    "tokens/s",
    "CPU s",
    "model RSS MiB",
    "peak RSS MiB",
    "disk / raw acts",
]


def measure(n_rows: int, buffer_mib: int, reps: int, shuffle: bool, device: str) -> tuple[dict, dict[str, list[dict]]]:
    with scratch("scaling") as tmp:
        data = prepare_tokens(tmp, 4 * n_rows)
        job = forward_vs_cache.sae_cache_job(
            data, tmp / "cache", n_rows * CONTEXT, buffer_mib * MiB / GB, device, shuffle
        )
        return data, alternate({"1x": job, "4x": job.but(training_tokens=4 * n_rows * CONTEXT)}, reps)


def report(runs: dict[str, list[dict]], data: dict, buffer_mib: int, reps: int, shuffle: bool) -> None:
    one, four = best(runs["1x"]), best(runs["4x"])
    header(
        "(e) scaling: 1x and 4x the tokens",
        f"sae_cache end to end, model: {data['kind']}, hook {HOOK}, context {CONTEXT}, batch {BATCH}, "
        f"buffer {buffer_mib} MiB, shuffle={shuffle}; best of {reps}; {threads_text(one)}",
    )
    rows = [
        [
            name,
            f0(r["tokens"]),
            r["n_buffers"],
            f2(r["seconds"]),
            times(runs[name]),
            f0(r["tokens"] / r["seconds"]),
            f2(r["cpu_s"]),
            f0(r["base_hwm_mib"]),
            f0(r["hwm_mib"]),
            f3(r["disk_bytes"] / r["raw_act_bytes"]),
        ]
        for name, r in (("1x", one), ("4x", four))
    ]
    table(COLUMNS, rows)
    print(
        f"\n4x / 1x time: **{four['seconds'] / one['seconds']:.2f}** (CPU seconds {four['cpu_s'] / one['cpu_s']:.2f}); "
        f"peak RSS 4x - 1x: **{four['hwm_mib'] - one['hwm_mib']:+,.0f} MiB**"
    )


def verdicts(one: dict, four: dict, quick: bool) -> list[Verdict]:
    time_ratio = four["seconds"] / one["seconds"]
    cpu_ratio = four["cpu_s"] / one["cpu_s"]
    flat = four["hwm_mib"] - one["hwm_mib"] <= 0.10 * one["hwm_mib"] + 64
    judged = None if quick else True
    return [
        Verdict(
            "1e 4x tokens / 1x time",
            f"{time_ratio:.2f} (CPU {cpu_ratio:.2f})",
            "about 4 (3.4-4.6)",
            judged and 3.4 <= time_ratio <= 4.6,
        ),
        Verdict(
            "1e peak RSS 4x vs 1x",
            f"{four['hwm_mib']:,.0f} vs {one['hwm_mib']:,.0f} MiB",
            "flat (+10% + 64 MiB)",
            judged and flat,
        ),
    ]


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0], device=True)
    p.add_argument(
        "--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens at 1x (default 2048: 262,144 tokens)"
    )
    p.add_argument("--buffer-mib", type=int, default=None, help="buffer_size_gb in MiB (default 64)")
    p.add_argument("--shuffle", action="store_true", help="shuffle=True (default False)")
    args = parse(p, argv)
    n_rows = args.rows or (64 if args.quick else 2048)
    reps = args.reps or (1 if args.quick else 3)
    buffer_mib = args.buffer_mib or (1 if args.quick else 64)
    data, runs = measure(n_rows, buffer_mib, reps, args.shuffle, args.device)
    report(runs, data, buffer_mib, reps, args.shuffle)
    return verdicts(best(runs["1x"]), best(runs["4x"]), args.quick)


if __name__ == "__main__":
    entry(main, {})
