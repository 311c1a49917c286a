"""(e) Scaling: sae_cache end to end on 1x and 4x the tokens, same buffer size.

    python -m benchmark.scaling [--quick] [--reps N] [--rows R] [--buffer-mib M] [--shuffle]

Runs `CacheActivationsRunner` (shuffle=False unless --shuffle) on R rows and on 4R rows of 128
tokens with 64 MiB buffers, alternating, best of N. Target (issue 3, 1e): 4x the tokens takes about
4x the time (we check 3.4x-4.6x) and the peak RSS stays flat (4x run within 10% + 64 MiB of the 1x).
"""

from __future__ import annotations

from benchmark._common import (
    BATCH,
    CONTEXT,
    GB,
    HOOK,
    MiB,
    Verdict,
    alternate,
    best,
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


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--rows", type=int, default=None, help=f"rows of {CONTEXT} tokens at 1x (default 2048: 262,144 tokens)"
    )
    p.add_argument("--buffer-mib", type=int, default=None, help="buffer_size_gb in MiB (default 64)")
    p.add_argument("--shuffle", action="store_true", help="shuffle=True (default False)")
    args = parse(p, argv)
    n_rows = args.rows or (64 if args.quick else 2048)
    reps = args.reps or (1 if args.quick else 3)
    buffer_mib = args.buffer_mib or (1 if args.quick else 64)
    with scratch("scaling") as tmp:
        data = prepare_tokens(tmp, 4 * n_rows)
        common = dict(
            task="sae_cache",
            data=data["path"],
            kind=data["kind"],
            batch=BATCH,
            context=CONTEXT,
            buffer_size_gb=buffer_mib * MiB / GB,
            shuffle=args.shuffle,
            out=str(tmp / "cache"),
        )
        specs = {
            "1x": dict(training_tokens=n_rows * CONTEXT, **common),
            "4x": dict(training_tokens=4 * n_rows * CONTEXT, **common),
        }
        runs = alternate(specs, reps)
    one, four = best(runs["1x"]), best(runs["4x"])
    header(
        "(e) scaling: 1x and 4x the tokens",
        f"sae_cache end to end, model: {data['kind']}, hook {HOOK}, context {CONTEXT}, batch {BATCH}, buffer {buffer_mib} MiB, "
        f"shuffle={args.shuffle}; best of {reps}; {threads_text(one)}",
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
    table(
        [
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
        ],
        rows,
    )
    time_ratio = four["seconds"] / one["seconds"]
    cpu_ratio = four["cpu_s"] / one["cpu_s"]
    rss_growth = four["hwm_mib"] - one["hwm_mib"]
    print(
        f"\n4x / 1x time: **{time_ratio:.2f}** (CPU seconds {cpu_ratio:.2f}); peak RSS 4x - 1x: **{rss_growth:+,.0f} MiB**"
    )
    quick = None if args.quick else True
    flat = rss_growth <= 0.10 * one["hwm_mib"] + 64
    return [
        Verdict(
            "1e 4x tokens / 1x time",
            f"{time_ratio:.2f} (CPU {cpu_ratio:.2f})",
            "about 4 (3.4-4.6)",
            quick and 3.4 <= time_ratio <= 4.6,
        ),
        Verdict(
            "1e peak RSS 4x vs 1x",
            f"{four['hwm_mib']:,.0f} vs {one['hwm_mib']:,.0f} MiB",
            "flat (+10% + 64 MiB)",
            quick and flat,
        ),
    ]


if __name__ == "__main__":
    main()
