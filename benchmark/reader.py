"""(g) The reader: `CachedActivations(...).batches(4096)` vs a raw read of the same bytes.

    python -m benchmark.reader [--quick] [--reps N] [--file-mib M] [--files K] [--batch-tokens T]

A synthetic cache (K data files of M MiB of float32 activations, d 256, rows of 128, written by
sae_cache's Arrow writer, with state.json) is read, warm in the page cache, by:

- raw readinto: each data file read sequentially into one reused buffer of one batch's bytes;
- raw np.fromfile: each data file read whole into a new array;
- reader, file order (views): `batches(T)` without touching the data (zero-copy views of the map);
- reader, file order (+ copy): each batch copied into a reused torch tensor (what a training step
  or a host-to-device copy does), so every byte is read;
- reader, shuffled (+ copy): `batches(T, shuffle=True)` (rows gathered in a seeded random order).

Tokens/s counts activations read. Runs alternate; best of N. Issue 3, item 3: the reader's
throughput against a raw read of the same bytes (no numeric target).
"""

from __future__ import annotations

from benchmark._common import (
    CONTEXT,
    Verdict,
    alternate,
    best,
    f0,
    f2,
    f3,
    header,
    parse,
    parser,
    run_worker,
    scratch,
    table,
    times,
)


def main(argv: list[str] | None = None) -> list[Verdict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--file-mib", type=int, default=None, help="MiB of activations per data file (default 256)")
    p.add_argument("--files", type=int, default=None, help="data files (default 4: 1 GiB)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    args = parse(p, argv)
    file_mib = args.file_mib or (8 if args.quick else 256)
    n_files = args.files or (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 3)
    modes = {
        "raw readinto": "raw_readinto",
        "raw np.fromfile": "raw_fromfile",
        "reader, file order (views)": "reader_view",
        "reader, file order (+ copy)": "reader_copy",
        "reader, shuffled (+ copy)": "reader_shuffled",
    }
    with scratch("reader") as tmp:
        cache = run_worker(
            "make_shards",
            directory=str(tmp / "cache"),
            shard_mib=file_mib,
            n_shards=n_files,
            context=CONTEXT,
            as_cache=True,
        )
        n_tokens = cache["n_rows"] * CONTEXT
        specs = {
            name: dict(
                task="read", cache=str(tmp / "cache"), mode=mode, batch_tokens=args.batch_tokens, n_tokens=n_tokens
            )
            for name, mode in modes.items()
        }
        run_worker(
            "read", cache=str(tmp / "cache"), mode="raw_readinto", batch_tokens=args.batch_tokens, n_tokens=n_tokens
        )  # warm
        runs = alternate(specs, reps)
    header(
        "(g) the reader vs a raw read of the same bytes",
        f"{n_files} files x {file_mib} MiB activations ({cache['bytes'] / 1e9:.2f} GB on disk, {n_tokens:,} tokens), warm page cache; "
        f"batches of {args.batch_tokens} tokens; best of {reps}",
    )
    raw = best(runs["raw readinto"])
    raw_rate = raw["tokens"] / raw["seconds"]
    rows = []
    for name in modes:
        r = best(runs[name])
        rate = r["tokens"] / r["seconds"]
        rows.append(
            [
                name,
                f0(r["tokens"]),
                f3(r["seconds"]),
                times(runs[name]),
                f0(rate),
                f0(rate * (256 * 4 + 4) / 1e6),
                f3(rate / raw_rate),
                f2(r["cpu_s"]),
                f0(r["hwm_mib"]),
                f0(r["rss_file_end_mib"]),
            ]
        )
    table(
        [
            "read",
            "tokens",
            "best s",
            "all runs s",
            "tokens/s",
            "MB/s",
            "vs raw readinto",
            "CPU s",
            "peak RSS MiB",
            "file-backed RSS at end MiB",
        ],
        rows,
    )
    ordered = best(runs["reader, file order (+ copy)"])
    shuffled = best(runs["reader, shuffled (+ copy)"])
    r_o = ordered["tokens"] / ordered["seconds"] / raw_rate
    r_s = shuffled["tokens"] / shuffled["seconds"] / raw_rate
    print(f"\nreader / raw readinto tokens/s: file order **{r_o:.2f}**, shuffled **{r_s:.2f}**")
    return [
        Verdict("3 reader file order (+copy) / raw read", f"{r_o:.2f}", "reported (no target)", None),
        Verdict("3 reader shuffled (+copy) / raw read", f"{r_s:.2f}", "reported (no target)", None),
    ]


if __name__ == "__main__":
    main()
